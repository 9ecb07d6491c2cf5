#!/usr/bin/env bash
# The checks that need an accelerator, as one command for a borrowed GPU
# machine (docs/DEVELOPING.md, "GPU checks"): a short CUDA training run,
# bench_schedule.py on the machine's idle cores (CPU, gloo), bench_gpu.py (3B-class thinker: tokens/s, MFU, peak memory) and
# bench_moe.py's loop-vs-grouped ratio on the device. Logs go to $1 (or
# $OUT). Wheels of packages the machine lacks, if carried in .whl/, are
# installed first.
#
#   bash scripts/gpu_checks.sh [LOG_DIR]        # on the GPU machine
#   DEVICE=cpu bash scripts/gpu_checks.sh /tmp/x # the same steps, shrunk, on CPU (checks this script)
set -u -o pipefail
out=${1:-${OUT:-/tmp/gpu_checks}}
mkdir -p "$out"
dev=${DEVICE:-cuda}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1

step() {  # name, seconds, command...: run it, keep its log, show its end
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$out/$name.log"
  echo "== $name rc=$rc"
}

python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee "$out/env.log"
if [ "$dev" = cpu ]; then
  step train 300 python3 -m omnitrain train.device=cpu train.steps=2 hydra.run.dir="$out/run"
  step bench_schedule 120 python3 scripts/bench_schedule.py --steps 2
  step bench_gpu 300 python3 scripts/bench_gpu.py --smoke
  step bench_moe 300 python3 scripts/bench_moe.py --tokens-30b 8 --repeat 1
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/env.log"
  step train 120 python3 -m omnitrain train.device="$dev" train.steps=3 hydra.run.dir="$out/run"
  # CPU-only, but the lent machine's 16 idle cores are the quiet host issue 16's targets need
  step bench_schedule 90 python3 scripts/bench_schedule.py
  step bench_gpu 240 python3 scripts/bench_gpu.py
  step bench_moe 120 python3 scripts/bench_moe.py --device "$dev" --dtype bf16 --tokens-30b 4096 --repeat-30b 3 --weight-grads-30b
fi
