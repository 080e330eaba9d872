#!/usr/bin/env bash
# The one prepared GPU check (H100/H200). Run on the device machine from the repo root:
#   bash benchmarks/gpu_check.sh            # GPU tests, then the B/2 ratio table (~8-9 min, cold caches)
#   bash benchmarks/gpu_check.sh tests      # only the GPU tests (pytest -m gpu)
#   bash benchmarks/gpu_check.sh bench      # only the ratio table; CASES="XL/2:64" picks other cases
#   bash benchmarks/gpu_check.sh sampler    # only the sampler table (batch 1 and 256, graph/eager/compiled)
#   bash benchmarks/gpu_check.sh firststep  # cold-cache seconds to the first MeanFlow step, with and without
#                                           # kernels/precompile.py (B/2 b128; CASES_FIRST="XL/2:64" for XL/2)
#   bash benchmarks/gpu_check.sh backward   # each op's primal backward: ours vs torch eager / compiled
#   bash benchmarks/gpu_check.sh attention  # attention fwd + tangent vs torch.func.jvp, jvp_flash_attention
#                                           # (installed from .gpu_wheels/ when carried: fetch_baselines.sh)
# Full logs go under $OUT (or ./gpu_check_out when OUT is unset). Each phase has its own time limit, so
# a slow phase cannot eat the other's budget. Before a session, on any CPU machine:
#   PYTHONPATH=. python benchmarks/compile_check.py     # every kernel config compiles for sm_90/sm_80
set -uo pipefail
PHASE=${1:-all}
OUT=${OUT:-gpu_check_out}
CASES=${CASES:-"B/2:128"}
mkdir -p "$OUT"
export PYTHONPATH=.
PY=$(command -v python3 || command -v python)  # the device image: python3 (a venv; python may exist too)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

if [[ $PHASE == all || $PHASE == tests ]]; then
    echo "== GPU tests (pytest -m gpu) =="
    # Cold Triton cache: autotuning compiles ~110 attention configs in the bf16/fp16 tests alone
    # (estimated 200-330 s serial from benchmarks/compile_check.py compile times). Compilation is
    # CPU-bound, so the tests run in parallel processes on the one GPU (pytest-xdist, on the device image;
    # the whole CPU suite also passes under -n 2).
    XDIST=""
    if "$PY" -c "import xdist" 2> /dev/null; then XDIST="-n ${TEST_WORKERS:-8}"; fi
    # shellcheck disable=SC2086
    timeout 330 "$PY" -m pytest tests/ -q -m gpu -p no:cacheprovider -rs --durations=15 $XDIST \
        > "$OUT/tests.log" 2>&1
    echo "pytest exit $? ($(tail -n 1 "$OUT/tests.log"))"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi

if [[ $PHASE == all || $PHASE == bench ]]; then
    echo "== ratio table: $CASES =="
    # shellcheck disable=SC2086
    timeout 240 "$PY" -m benchmarks.report --quick --sampler no --cases $CASES \
        --out "$OUT/benchmark_results.json" 2>&1 | grep -v '^W[0-9]' | tee "$OUT/report.log"
fi

if [[ $PHASE == firststep ]]; then
    echo "== first MeanFlow step from a cold Triton cache (issue 5: <= 60 s) =="
    # each run in a fresh process with an empty Triton cache: plain, then with the parallel precompile
    for c in ${CASES_FIRST:-"B/2:128"}; do
        for pre in "" "--precompile"; do
            timeout 200 "$PY" -m benchmarks.first_step --preset "${c%%:*}" --batch "${c##*:}" $pre 2>&1 \
                | grep -v '^W[0-9]' | tee -a "$OUT/first_step.log"
        done
    done
fi

if [[ $PHASE == attention ]]; then
    echo "== attention fwd + tangent (pytest-benchmark) =="
    if compgen -G ".gpu_wheels/jvp_flash_attention-*.whl" > /dev/null; then
        "$PY" -m pip install --quiet --no-deps --no-index --target .gpu_pkgs .gpu_wheels/jvp_flash_attention-*.whl \
            && export PYTHONPATH=.:.gpu_pkgs
    else
        echo "(no .gpu_wheels/jvp_flash_attention wheel carried: that baseline will skip)"
    fi
    timeout 240 "$PY" -m pytest benchmarks/bench_attention.py --benchmark-only -q -p no:cacheprovider -rs \
        --benchmark-json "$OUT/attention.json" > "$OUT/attention.log" 2>&1
    echo "pytest exit $? ($(tail -n 1 "$OUT/attention.log"))"
    "$PY" -m benchmarks.attention_table "$OUT/attention.json" | tee "$OUT/attention_table.txt"
fi

if [[ $PHASE == backward ]]; then
    echo "== primal backward: ours vs torch eager vs torch.compile (issue 4) =="
    timeout 240 "$PY" -m benchmarks.backward --out "$OUT/backward.json" 2>&1 | grep -v '^W[0-9]' \
        | tee "$OUT/backward.log"
fi

if [[ $PHASE == sampler ]]; then
    echo "== sampler table =="
    timeout 240 "$PY" -m benchmarks.report --sampler only --out "$OUT/sampler_results.json" \
        2>&1 | grep -v '^W[0-9]' | tee "$OUT/sampler.log"
fi
