#!/usr/bin/env bash
# The one prepared GPU check (H100/H200). Run on the device machine from the repo root, as
#   bash benchmarks/tools/gpu_check.sh [PHASE[,PHASE...]]
# with these phases (default: tests,bench, ~8-9 min from cold caches):
#   tests      the GPU tests (pytest -m gpu: every test marked requires_cuda, the iMF kernels' and
#              tests/imf/ included)
#   bench      the B/2 ratio table; CASES="XL/2:64" picks other cases;
#              REPORT_ARGS=--no-compiled-step skips the compiled MF step row
#   sampler    the sampler table (batch 1 and 256, graph/eager/compiled)
#   firststep  cold-cache seconds to the first MeanFlow step, with and without
#              meanflow_fast/kernels/precompile.py (B/2 b128; CASES_FIRST="XL/2:64" for XL/2;
#              FIRST_MODES="--precompile,--compile-step" for the compiled step)
#   backward   each op's primal backward: ours vs torch eager / compiled
#   sweep      every attention config alone (+ sweep-only ones): faults, errors, time (D 64/72/80;
#              D 72's high chunk 16 or 64 wide)
#   gemm       every dual-GEMM config alone at fc1's shapes vs cuBLAS
#              (GEMM_LAUNCHES="dual_gelu primal_gelu", GEMM_SHAPES=B/2)
#   ops        per-op TFLOP/s or GB/s (benchmarks/bench_dual_ops.py, eager; OPS_K picks others): dual
#              linear Triton vs cuBLAS; the MLP backward GELU pass (gelu_bwd) vs torch; residual + LN
#              fused vs apart (config switch residual_ln); the no-grad plain MLP (fc1 on cuBLASLt vs
#              Triton: no_grad_fc1) and residual + LN
#   train      meanflow-train end to end on synthetic latents (CUDA path, resume, images/s at per-rank
#              batch 32 vs 128: TRAIN_BATCHES)
#   attention  attention fwd + tangent vs torch.func.jvp, jvp_flash_attention (installed from
#              .gpu_wheels/ when carried: benchmarks/tools/fetch_baselines.sh)
#   imf        iMF: per-op fwd + tangent vs the torch references (benchmarks/bench_imf_ops.py, eager and
#              compiled; IMF_OPS_K picks cases), then the iMF ratio table with the issue's targets
#              (IMF_CASES="iMF-B/2:128,iMF-XL/2:64"; IMF_REPORT_ARGS, e.g. --no-compiled-step)
# Several phases run in one device call, in the order given (BUDGET=500 ... tests,bench,attention); with
# BUDGET (seconds) every phase's limit shrinks to what is left of it, so the call ends with its logs
# inside the lease; the ratio table times the JVP right after the forward baselines and rewrites its
# JSON after each row (REPORT_ARGS="--skip ..." drops optional rows: python -m benchmarks.report --help).
# DRY=1 is a dry run on a CPU machine (CI does one): every script with --device cpu (Triton's
# interpreter, tiny shapes), the pytest phases skip; it checks this script, not the kernels.
# The call exits 1, naming them, when a phase's command failed (124: it ran out of its time limit).
# Full logs go under $OUT (or ./gpu_check_out when OUT is unset). Each phase has its own time limit, so
# a slow phase cannot eat the other's budget. Before a GPU run, on any CPU machine:
#   python -m benchmarks.tools.compile_check     # every kernel config compiles for sm_90/sm_80
set -uo pipefail
PHASES=${1:-all}
OUT=${OUT:-gpu_check_out}
BUDGET=${BUDGET:-0}
START=$SECONDS
# lim N: a phase's time limit, N seconds or what is left of BUDGET (less a margin), whichever is less
lim() {
    local l=$1
    if (( BUDGET > 0 )); then
        local left=$(( BUDGET - (SECONDS - START) - 10 ))
        (( left < l )) && l=$left
    fi
    (( l < 5 )) && l=5
    echo "$l"
}
# DRY=1: the same phases on a CPU machine, each script with --device cpu at tiny shapes
DEVICE_ARGS=""
if [[ ${DRY:-0} == 1 ]]; then
    DEVICE_ARGS="--device cpu"
    export TRITON_INTERPRET=1
    CASES=${CASES:-"tiny:2"} CASES_FIRST=${CASES_FIRST:-"tiny:2"} TEST_WORKERS=${TEST_WORKERS:-2} IMF_CASES=${IMF_CASES:-"iMF-tiny:2"}
    SWEEP_DIMS=${SWEEP_DIMS:-72} SWEEP_HI=${SWEEP_HI:-16} SWEEP_JOBS=${SWEEP_JOBS:-2} GEMM_SHAPES=${GEMM_SHAPES:-B/2}
fi
CASES=${CASES:-"B/2:128"}
IMF_CASES=${IMF_CASES:-"iMF-B/2:128,iMF-XL/2:64"}
FAILED=()
# note NAME STATUS: remember a command that failed. pytest's 5 (no test ran: a benchmark module skipped
# whole, as without CUDA) is a failure on a GPU and expected in a dry run.
note() {
    (( $2 == 0 )) && return
    [[ ${DRY:-0} == 1 && $1 == pytest* && $2 == 5 ]] && return
    FAILED+=("$1 (exit $2)")
}
# pytest_done NAME LOG STATUS: print a pytest phase's exit and summary line, and note a failure
pytest_done() {
    echo "pytest exit $3 ($(tail -n 1 "$2"))"
    note "pytest $1" "$3"
}
mkdir -p "$OUT"
export PYTHONPATH=.
# Triton's and inductor's caches in the git-ignored .gpu_cache/ of the repo copy, which the device tool
# keeps between calls on a warm machine: a second call reuses the first call's compiled kernels
# (benchmarks/tools/first_step.py points its cold-start runs at empty directories of their own).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.gpu_cache/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.gpu_cache/inductor}
PY=$(command -v python3 || command -v python)  # the device image: python3 (a venv; python may exist too)
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
else
    echo "no nvidia-smi (DRY=${DRY:-0})" | tee "$OUT/device.txt"
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

phase_tests() {
    echo "== GPU tests (pytest -m gpu) =="
    # From a cold Triton cache the bf16/fp16 tests alone autotune ~110 attention configs, and compiling is
    # CPU-bound: the tests run in parallel processes on the one GPU (pytest-xdist, when installed).
    XDIST=""
    if "$PY" -c "import xdist" 2> /dev/null; then XDIST="-n ${TEST_WORKERS:-8}"; fi
    # shellcheck disable=SC2086
    timeout "$(lim "${TESTS_LIMIT:-330}")" "$PY" -m pytest tests/ -q -m gpu -p no:cacheprovider -rs --durations=15 $XDIST \
        > "$OUT/tests.log" 2>&1
    pytest_done tests "$OUT/tests.log" $?
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
}

phase_bench() {
    echo "== ratio table: $CASES =="
    # shellcheck disable=SC2086
    timeout "$(lim 320)" "$PY" -m benchmarks.report --quick --sampler no --cases $CASES ${REPORT_ARGS:-} $DEVICE_ARGS \
        --out "$OUT/benchmark_results.json" 2>&1 | grep -v '^W[0-9]' | tee "$OUT/report.log"
    note bench "${PIPESTATUS[0]}"
}

phase_firststep() {
    echo "== first MeanFlow step from a cold Triton cache (issue 5: <= 60 s) =="
    # each run in a fresh process with an empty Triton cache: plain, then with the parallel precompile
    for c in ${CASES_FIRST:-"B/2:128"}; do
        for pre in ${FIRST_MODES:-plain --precompile}; do
            [[ $pre == plain ]] && pre=""
            pre=${pre//,/ }  # one mode of several flags: "--precompile,--compile-step"
            timeout "$(lim 200)" "$PY" -m benchmarks.tools.first_step --preset "${c%%:*}" --batch "${c##*:}" $pre \
                $DEVICE_ARGS 2>&1 | grep -v '^W[0-9]' | tee -a "$OUT/first_step.log"
            note "firststep $c ${pre:-plain}" "${PIPESTATUS[0]}"
        done
    done
}

phase_attention() {
    echo "== attention fwd + tangent (pytest-benchmark) =="
    if compgen -G ".gpu_wheels/jvp_flash_attention-*.whl" > /dev/null; then
        "$PY" -m pip install --quiet --no-deps --no-index --target .gpu_pkgs .gpu_wheels/jvp_flash_attention-*.whl \
            && export PYTHONPATH=.:.gpu_pkgs
    else
        echo "(no .gpu_wheels/jvp_flash_attention wheel carried: that baseline will skip)"
    fi
    timeout "$(lim 240)" "$PY" -m pytest benchmarks/bench_attention.py --benchmark-only -q -p no:cacheprovider -rs \
        --benchmark-json "$OUT/attention.json" > "$OUT/attention.log" 2>&1
    pytest_done attention "$OUT/attention.log" $?
    [[ -f "$OUT/attention.json" ]] || { echo "(no benchmark JSON written: see $OUT/attention.log)"; return; }
    "$PY" -m benchmarks.attention_table "$OUT/attention.json" | tee "$OUT/attention_table.txt"
    note "attention table" "${PIPESTATUS[0]}"
}

phase_ops() {
    echo "== per-op figures (eager): fused ops vs their torch references; dual linear Triton vs cuBLAS =="
    timeout "$(lim 240)" "$PY" -m pytest benchmarks/bench_dual_ops.py --benchmark-only -q -p no:cacheprovider \
        -k "${OPS_K:-dual_linear or gelu_bwd or gated_residual_ln_fwd_tangent or (plain_no_grad and not compiled) or (eager and not torch_jvp)}" --benchmark-columns=median \
        --benchmark-json "$OUT/dual_ops.json" > "$OUT/dual_ops.log" 2>&1
    pytest_done ops "$OUT/dual_ops.log" $?
    [[ -f "$OUT/dual_ops.json" ]] || { echo "(no benchmark JSON written: see $OUT/dual_ops.log)"; return; }
    "$PY" - "$OUT/dual_ops.json" <<'PYEOF'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    rate = {k: v for k, v in e.items() if k in ("TFLOP/s", "GB/s")}
    print(f"  {b['name']:<48} {e.get('ms', float('nan')):8.4f} ms  {rate}  x_baseline {e.get('x_eager_ref_fwd')}")
PYEOF
}

phase_imf() {
    echo "== iMF ops: fwd + tangent vs the torch references (eager and compiled) =="
    # (in a dry run the benchmark module skips: its factories are tested in tests/test_benchmark_tools.py)
    timeout "$(lim 300)" "$PY" -m pytest benchmarks/bench_imf_ops.py --benchmark-only -q -p no:cacheprovider -rs \
        ${IMF_OPS_K:+-k "$IMF_OPS_K"} --benchmark-columns=median --benchmark-json "$OUT/imf_ops.json" \
        > "$OUT/imf_ops.log" 2>&1
    pytest_done imf-ops "$OUT/imf_ops.log" $?
    if [[ -f "$OUT/imf_ops.json" ]]; then
        "$PY" - "$OUT/imf_ops.json" <<'PYEOF'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    rate = {k: v for k, v in e.items() if k in ("TFLOP/s", "GB/s")}
    print(f"  {b['name']:<64} {e.get('ms', float('nan')):8.4f} ms  {rate}  x_baseline {e.get('x_eager_ref_fwd')}")
PYEOF
    else
        echo "(no benchmark JSON written: see $OUT/imf_ops.log)"
    fi
    echo "== iMF ratio table: $IMF_CASES (targets beside the ratios) =="
    # shellcheck disable=SC2086
    timeout "$(lim 480)" "$PY" -m benchmarks.report --quick --sampler no --cases $IMF_CASES ${IMF_REPORT_ARGS:-} \
        $DEVICE_ARGS --out "$OUT/imf_results.json" 2>&1 | grep -v '^W[0-9]' | tee "$OUT/imf_report.log"
    note imf "${PIPESTATUS[0]}"
}

phase_sweep() {
    echo "== attention configs one by one (fault / error / time), XL/2 batch-64 shape =="
    for k in ${SWEEP_KERNELS:-fwd_tangent dkdv dq}; do
        timeout "$(lim 200)" "$PY" -m benchmarks.tools.attention_sweep --kernel "$k" \
            --dims "${SWEEP_DIMS:-64,72,80}" --hi "${SWEEP_HI:-16,64}" --extra --jobs "${SWEEP_JOBS:-12}" \
            --out "$OUT/sweep_$k.json" $DEVICE_ARGS 2>&1 | grep -v '^W[0-9]' | tee -a "$OUT/sweep.log"
        note "sweep $k" "${PIPESTATUS[0]}"
    done
}

phase_gemm() {
    echo "== dual GEMM configs one by one at the fc1 shapes, against cuBLAS (B/2 b128, XL/2 b64) =="
    for l in ${GEMM_LAUNCHES:-dual_gelu}; do
        timeout "$(lim 200)" "$PY" -m benchmarks.tools.gemm_sweep --launch "$l" \
            --shapes "${GEMM_SHAPES:-B/2,XL/2}" --extra --jobs "${SWEEP_JOBS:-12}" --out "$OUT/gemm_$l.json" \
            $DEVICE_ARGS 2>&1 | grep -v '^W[0-9]' | tee -a "$OUT/gemm.log"
        note "gemm $l" "${PIPESTATUS[0]}"
    done
}

phase_backward() {
    echo "== primal backward: ours vs torch eager vs torch.compile (issue 4) =="
    timeout "$(lim 240)" "$PY" -m benchmarks.tools.backward --out "$OUT/backward.json" $DEVICE_ARGS 2>&1 \
        | grep -v '^W[0-9]' | tee "$OUT/backward.log"
    note backward "${PIPESTATUS[0]}"
}

phase_sampler() {
    echo "== sampler table =="
    # (--cases: only a dry run's sampler reads it, for its tiny preset)
    timeout "$(lim 240)" "$PY" -m benchmarks.report --sampler only --cases $CASES --out "$OUT/sampler_results.json" \
        $DEVICE_ARGS 2>&1 | grep -v '^W[0-9]' | tee "$OUT/sampler.log"
    note sampler "${PIPESTATUS[0]}"
}
phase_train() {
    echo "== meanflow-train on synthetic latents (the trainer's CUDA path; images/s at per-rank batch 32 and 128) =="
    # shards and checkpoints in a temporary folder (not under \$OUT: the device tool brings back \$OUT)
    # shellcheck disable=SC2086
    timeout "$(lim 300)" "$PY" -m benchmarks.tools.train_smoke --batches "${TRAIN_BATCHES:-32,128}" --timeout 150 \
        --log-dir "$OUT/train" --out "$OUT/train_smoke.json" $DEVICE_ARGS 2>&1 | grep -v '^W[0-9]' | tee "$OUT/train_smoke.log"
    note train "${PIPESTATUS[0]}"
}
[[ $PHASES == all ]] && PHASES=tests,bench
for ph in ${PHASES//,/ }; do
    if ! declare -F "phase_$ph" > /dev/null; then
        echo "gpu_check: unknown phase '$ph' (phases: tests bench attention ops imf sweep gemm firststep backward sampler train)"; exit 2
    fi
done
for ph in ${PHASES//,/ }; do "phase_$ph"; done
echo "gpu_check: phases $PHASES done in $(( SECONDS - START )) s"
# the device tool brings back at most 8 files from $OUT: pack the logs into one archive when there are more
if (( $(find "$OUT" -type f | wc -l) > 8 )); then
    tar -czf /tmp/gpu_check_logs.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete \
        && mv /tmp/gpu_check_logs.tgz "$OUT/" && echo "gpu_check: logs packed into $OUT/gpu_check_logs.tgz"
fi
if (( ${#FAILED[@]} )); then
    echo "gpu_check: failing commands: ${FAILED[*]}"
    exit 1
fi
