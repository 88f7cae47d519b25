#!/usr/bin/env bash
# The GPU benchmarks in device calls (docs/benchmarks.md, "Running the GPU benchmarks").
# Usage: bash bench/run_gpu_benchmarks.sh [OUT_DIR] [TOTAL_SECONDS] [all|quality|speed] [ARGS]
#   quality  the quality benchmark alone, with all of TOTAL_SECONDS (one 600 s call)
#   speed    the speed benchmark and the launch count (at most 3.8 minutes)
#   all      speed first, then quality with the time that is left
#   ARGS     more options for bench_quality.py, e.g. `--seeds 0 --budgets 0.1 --tau-candidates 0`
set -u
out=${1:-${OUT:-runs/gpu-bench}}
total=${2:-585}
what=${3:-all}
shift $(($# < 3 ? $# : 3))
start=$SECONDS
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then  # pydantic & co., missing on the GPU image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'

if [ "$what" != quality ]; then
  timeout 170 python3 bench/bench_pipeline_speed.py --out "$out/speed.json" 2> "$out/speed.log"
  echo "speed: exit $? after $((SECONDS - start)) s"; tail -n 12 "$out/speed.log"
  timeout 60 python3 bench/bench_launches.py --out "$out/launches.json" 2> "$out/launches.log"
  echo "launches: exit $? after $((SECONDS - start)) s"
fi

if [ "$what" != speed ]; then
  left=$((total - (SECONDS - start)))
  if [ "$left" -le 45 ]; then  # no time budget left (and `timeout 0` would never kill)
    echo "quality: skipped, $left s left of $total"
  else
    timeout $((left - 5)) python3 bench/bench_quality.py --time-budget-s $((left - 45)) \
      --out "$out/quality.json" "$@" 2> "$out/quality.log" > /dev/null
    echo "quality: exit $? after $((SECONDS - start)) s"
    grep -E "MetaPruning|tau|skip|fail|cancel|started|stopped" "$out/quality.log" | tail -n 40
  fi
fi
