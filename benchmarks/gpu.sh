#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md, docs/planning.md and docs/distributed.md (FSDP2 LoRA against its
# plan) in one run, then one table of the targets and whether each is met:
#   bash benchmarks/gpu.sh [OUT_DIR]            # one GPU (planned to stay under 8 minutes); OUT_DIR: runs/bench-gpu
#   bash benchmarks/gpu.sh --smoke [OUT_DIR]    # the same scripts on CPU, tiny shapes, < 1 min; runs/bench-gpu-smoke
# Needs a CUDA build of torch and bitsandbytes (pip install bitsandbytes) next to peftbench. Each step's table
# goes to OUT_DIR/<step>.md and its rows to OUT_DIR/<step>.json; exits non-zero when a step crashes.
set -uo pipefail
smoke=0
if [[ ${1:-} == --smoke ]]; then smoke=1; shift; fi
default=runs/bench-gpu
(( smoke )) && default=runs/bench-gpu-smoke
out=${1:-$default}  # runs/ is ignored by git
here=$(dirname "$0")
mkdir -p "$out"
export PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
status=0

step() {  # step NAME COMMAND...: run, keep its table, report its time
  local name=$1 start=$SECONDS
  shift
  if ! "$@" > "$out/$name.md" 2> "$out/$name.err"; then
    echo "step $name failed: $out/$name.err"
    status=1
  fi
  grep '^|' "$out/$name.md"
  echo "($name: $((SECONDS - start)) s)"
}

if (( smoke )); then  # tiny shapes on CPU: every script and argument the GPU run uses, in seconds
  base=tiny large=tiny precision=no precisions=no,bf16 matrix_archs=tiny quantizations=none
  sizes=(--steps 2 --warmup 1 --batch-size 4 --seq-len 32)
  methods=full,lora,adapter matrix_methods=full,lora shapes=2x16 state_steps=4 state_every=2
  echo "smoke run on CPU: torch $(python -c 'from importlib.metadata import version; print(version("torch"))')"
else
  base=bert-base-chinese large=hfl/chinese-roberta-wwm-ext-large precision=bf16 precisions=fp16,bf16
  matrix_archs=bert-base-chinese,qwen2-small quantizations=none,8bit,4bit
  sizes=(--steps 20 --warmup 5 --batch-size 32 --seq-len 128)
  methods=full,lora,adapter,prefix matrix_methods=full,lora shapes=2x16,8x128,32x128 state_steps=300 state_every=100
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi

step bert-base python "$here/throughput.py" --arch "$base" --precisions "$precision" --lengths fixed,tnews \
  --methods "$methods" "${sizes[@]}" --out "$out/bert-base.json"
step large python "$here/throughput.py" --arch "$large" --precisions "$precision" --lengths fixed \
  --methods full,lora "${sizes[@]}" --out "$out/large.json"
if (( ! smoke )); then  # inductor compiles for minutes on a CPU: the smoke run leaves this one out
  step large-compiled python "$here/throughput.py" --arch "$large" --precisions "$precision" --lengths fixed \
    --methods full --steps 20 --warmup 5 --batch-size 128 --compile --baselines "" \
    --out "$out/large-compiled.json"
fi
step plan python "$here/plan_check.py" --archs "$base,qwen2-small" --precision "$precision" --shapes "$shapes" \
  --methods "$methods" --out "$out/plan.json"
step fsdp python "$here/fsdp_check.py" --arch "$base" --precision "$precision" --steps "${sizes[1]}" \
  --batch-size "${sizes[5]}" --seq-len "${sizes[7]}" --out "$out/fsdp.json"
step state python "$here/state_overhead.py" --arch "$base" --precision "$precision" --steps "$state_steps" \
  --every "$state_every" --batch-size "${sizes[5]}" --seq-len "${sizes[7]}" --out "$out/state.json"
step matrix python "$here/precision_matrix.py" --arch "$matrix_archs" --precisions "$precisions" \
  --methods "$matrix_methods" --quantizations "$quantizations" --steps 4 --out "$out/matrix.json"
python "$here/targets.py" "$out" | tee "$out/targets.md"
echo "(all steps: $SECONDS s)"
exit $status
