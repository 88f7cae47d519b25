#!/usr/bin/env bash
# A short GPU check (about 4 minutes): the speed benchmark, then one quality run (seed 0, 10% of
# the MACs, no tau) to see the pipeline train and score on the device.
# Usage: bash bench/run_gpu_check.sh [OUT_DIR] [TOTAL_SECONDS]
set -u
out=${1:-${OUT:-runs/gpu-check}}
total=${2:-280}
start=$SECONDS
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1
timeout 170 python3 bench/bench_pipeline_speed.py --out "$out/speed.json" 2> "$out/speed.log" > /dev/null
echo "speed: exit $? after $((SECONDS - start)) s"; cat "$out/speed.log"
left=$((total - (SECONDS - start)))
timeout $((left - 5)) python3 bench/bench_quality.py --seeds 0 --budgets 0.1 --tau-candidates 0 \
  --time-budget-s $((left - 25)) --out "$out/quality.json" 2> "$out/quality.log" > /dev/null
echo "quality: exit $? after $((SECONDS - start)) s"; cat "$out/quality.log"
