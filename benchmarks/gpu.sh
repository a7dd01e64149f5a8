#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md and docs/distributed.md in one run (one GPU, about 10 minutes):
#   bash benchmarks/gpu.sh [OUT_DIR]
# Needs a CUDA build of torch and bitsandbytes (pip install bitsandbytes) next to peftbench.
set -uo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
export PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python benchmarks/throughput.py --arch bert-base-chinese --precisions bf16 --lengths fixed,tnews \
  --methods full,lora,adalora,adapter,prefix,bitfit --out "$out/bert-base.json" 2>"$out/bert-base.err" | grep '^|'
python benchmarks/throughput.py --arch hfl/chinese-roberta-wwm-ext-large --precisions bf16 --lengths fixed --methods full,lora \
  --out "$out/large.json" 2>"$out/large.err" | grep '^|'
python benchmarks/throughput.py --arch hfl/chinese-roberta-wwm-ext-large --precisions bf16 --lengths fixed --methods full,lora \
  --batch-size 128 --compile --out "$out/large-compiled.json" 2>"$out/large-compiled.err" | grep '^|'
python benchmarks/precision_matrix.py --arch bert-base-chinese,qwen2-small --precisions fp16,bf16 \
  2>"$out/matrix.err" | tee "$out/matrix.md"
