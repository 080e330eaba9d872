"""The kernels as the GPU machine's compiler sees them, on this CPU machine: ``benchmarks/tools/compile_check.py``
compiles them for sm_90 with Triton's own ptxas (no GPU needed). Run in a subprocess, since the tests
import the kernels under Triton's interpreter, which replaces the jit functions compile_check needs."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            tool = get_ptxas(90)  # triton ≥ 3.5 takes the target architecture
        except TypeError:
            tool = get_ptxas()
        return os.path.exists(tool.path)
    except Exception:  # noqa: BLE001 - any failure to find it means: cannot compile here
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas (the sm_90 compiler) is not installed")
def test_attention_tile_loads_are_pipelined_at_head_dims_64_and_72(tmp_path):
    """Every tl.dot attention kernel (forward with and without tangent, dK/dV, dQ) at D 64 and D 72 has
    asynchronous (cp.async) tile loads in its sm_90 TTGIR. At D 72 they had none until the launchers
    passed the stride alignment (kernels.attention._aligned): the head stride 72 is not a multiple of
    16, the only divisibility Triton infers for an integer argument, so every K/V tile was a scalar
    register load (docs/TUNING.md)."""
    out = tmp_path / "compile_check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO
    run = subprocess.run([sys.executable, "-m", "benchmarks.tools.compile_check", "--kernel", "_attn",
                          "--quick", "--targets", "90", "--dtypes", "bf16", "--json", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [r for r in json.loads(out.read_text()) if r["kernel"] != "_attn_bwd_preprocess_kernel"]
    seen = {(r["kernel"], r["variant"]) for r in rows}
    expected = {("_attn_fwd_jvp_kernel", f"bf16 D={d}{t}") for d in (64, 72) for t in ("", " +tangent")}
    expected |= {(k, f"bf16 D={d}") for k in ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel") for d in (64, 72)}
    assert expected <= seen, expected - seen
    for r in rows:
        assert r["status"] in ("OK", "SPILL"), r
        assert r["async_copies"] and r["async_copies"] > 0, (r["kernel"], r["variant"], r["async_copies"])


_RECORD_IMF = r"""
import json, sys
from benchmarks.tools import compile_check as cc
rows = []
for scen in cc.imf_scenarios(sys.argv[1]):
    sink = []
    with cc.recording(sink):
        scen.call()
    for ln in sink:
        flags = {k: v for k, v in ln.kwargs.items() if k in ("HAS_TANGENT", "STORE_AB", "HAS_DM", "HAS_DH")}
        rows.append([scen.family, scen.variant, ln.name, sorted(flags.items())])
print(json.dumps(rows))
"""


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_imf_scenarios_launch_every_imf_kernel_and_form(dtype):
    """compile_check's iMF scenarios, recorded (no compile): each iMF kernel is launched at both iMF
    presets' widths, the forward kernels with and without the tangent, the SwiGLU gate with and without
    the stored pre-activations (fp32 twice: IEEE and TF32 dots), the fused backward with dm, dh and both,
    the SwiGLU backward pass once per preset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO
    run = subprocess.run([sys.executable, "-c", _RECORD_IMF, dtype], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    forms = {(name, tuple(tuple(f) for f in flags)) for _, _, name, flags in rows}
    for kernel in ("_rms_norm_fwd_kernel", "_gated_residual_rmsnorm_fwd_kernel", "_qk_norm_rope_fwd_kernel"):
        assert {(kernel, (("HAS_TANGENT", t),)) for t in (True, False)} <= forms, kernel
    for kernel in ("_rms_norm_bwd_kernel", "_qk_norm_rope_bwd_kernel"):
        assert any(n == kernel for n, _ in forms), kernel
    assert {("_gated_residual_rmsnorm_bwd_kernel", (("HAS_DH", dh), ("HAS_DM", dm)))
            for dm, dh in ((True, True), (True, False), (False, True))} <= forms
    assert {("_swiglu_gate_kernel", (("HAS_TANGENT", t), ("STORE_AB", s))) for t in (True, False)
            for s in (True, False)} <= forms
    widths = {v.split("D=")[1].split()[0] for _, v, n, _ in rows if n == "_rms_norm_fwd_kernel"}
    assert widths == {"768", "1024"}
    gates = [v for f, v, n, _ in rows if n == "_swiglu_gate_kernel"]
    assert {v.split()[-1] for v in gates} == {"iMF-B/2", "iMF-XL/2"}
    assert len(gates) == 2 * 4 * (2 if dtype == "fp32" else 1)  # fp32: IEEE and TF32 dots
    bwd = [v for f, v, n, _ in rows if n == "_swiglu_bwd_kernel"]
    assert sorted(v.split()[1] for v in bwd) == ["iMF-B/2", "iMF-XL/2"]  # one launch per preset
    assert all(v.startswith(dtype) for _, v, _, _ in rows)


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas (the sm_90 compiler) is not installed")
def test_swiglu_gate_compiles_for_sm90(tmp_path):
    """The SwiGLU gate GEMM (four fp32 accumulators with the tangent) compiles for sm_90 at both iMF presets'
    shapes in all four forms, with the first config of its pruned list, and fits (OK or SPILL)."""
    out = tmp_path / "compile_check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO
    run = subprocess.run([sys.executable, "-m", "benchmarks.tools.compile_check", "--kernel", "_swiglu_gate",
                          "--quick", "--targets", "90", "--dtypes", "bf16", "--json", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 8 and {r["kernel"] for r in rows} == {"_swiglu_gate_kernel"}
    for r in rows:
        assert r["status"] in ("OK", "SPILL"), r
        assert r["async_copies"] and r["async_copies"] > 0, r  # pipelined tile loads


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas (the sm_90 compiler) is not installed")
def test_swiglu_bwd_compiles_for_sm90(tmp_path):
    """The SwiGLU backward's elementwise pass compiles for sm_90 at iMF-B/2 b128 and iMF-XL/2 b64 without
    spills. Rows per program, by hand from 8 × 256 tiles and at most 16384 programs before a program takes
    more row steps (a power of 2): B/2, 35328 rows × 2048: 4416 · 8 = 35328 tiles, 3 → 4 steps, 32 rows;
    XL/2, 17664 rows × 2730: 2208 · 11 = 24288 tiles, 2 steps, 16 rows."""
    out = tmp_path / "compile_check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO
    run = subprocess.run([sys.executable, "-m", "benchmarks.tools.compile_check", "--kernel", "_swiglu_bwd",
                          "--quick", "--targets", "90", "--dtypes", "bf16", "--json", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == {"_swiglu_bwd_kernel"}
    configs = {r["variant"].split()[1]: r["config"] for r in rows}
    assert len(rows) == 2 and configs == {"iMF-B/2": "RPP32 BR8 BN256 w8 s3", "iMF-XL/2": "RPP16 BR8 BN256 w8 s3"}
    for r in rows:
        assert r["status"] == "OK" and r["spill_st"] == 0, r
