#!/usr/bin/env bash
# One-time set-up of the active Python environment: the CPU build of torch first (a plain `torch` requirement
# would pull a multi-GB CUDA build), then this package with its test extras.
set -euo pipefail
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
