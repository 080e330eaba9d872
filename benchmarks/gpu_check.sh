#!/usr/bin/env bash
# The one prepared GPU check (H100/H200, ~5 minutes): GPU tests, then the ratio table.
#   run on the device machine from the repo root:  bash benchmarks/gpu_check.sh
# Full logs go under $OUT (or ./gpu_check_out when OUT is unset).
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

echo "== GPU tests =="
timeout 240 python -m pytest tests/ -q -m gpu -p no:cacheprovider \
    > "$OUT/tests.log" 2>&1
echo "pytest exit $? ($(tail -n 1 "$OUT/tests.log"))"
grep -E "FAILED|Error" "$OUT/tests.log" | head -20

echo "== ratio table =="
timeout 300 python -m benchmarks.report --quick --out "$OUT/benchmark_results.json" 2>&1 | tee "$OUT/report.log"
