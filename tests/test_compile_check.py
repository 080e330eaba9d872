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
