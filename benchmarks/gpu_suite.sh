#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md in one command, for a machine with one GPU and no network:
#   bash benchmarks/gpu_suite.sh <folder with all-MiniLM-L6-v2/, rotten_tomatoes/, fashion_mnist/> <results folder>
# The accuracy runs need `datasets` (not `evaluate`); carry its wheels where it is missing.
set -euo pipefail
shared=${1:?folder holding all-MiniLM-L6-v2/, rotten_tomatoes/ and fashion_mnist/}
results=${2:?folder for the result files}
export PYTHONPATH=. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$results"
python benchmarks/step_cost.py --shape bert-base --batch_size 32 --seq_len 128 --bf16 \
    --output "$results/step_cost_bert_base_gpu.json"
python benchmarks/step_cost.py --shape minilm --batch_size 32 --seq_len 64 --bf16 \
    --output "$results/step_cost_minilm_gpu.json"
python benchmarks/accuracy.py --task text --suite full --parallel 12 --mixed_precision bf16 \
    --model "$shared/all-MiniLM-L6-v2" --data_dir "$shared/rotten_tomatoes" --runs_dir /tmp/text_runs \
    --output "$results/text_accuracy_gpu.json"
python benchmarks/accuracy.py --task vision --suite full --parallel 12 --mixed_precision bf16 \
    --data_dir "$shared/fashion_mnist" --runs_dir /tmp/vision_runs --output "$results/vision_accuracy_gpu.json"
