"""The primal backward of each fused op against PyTorch's, at DiT-B/2 batch-128 shapes (bf16): the
measurement behind "Triton where it wins, cuBLAS where it wins" (issue 4).

    PYTHONPATH=. python -m benchmarks.tools.backward [--out backward.json]

For each op, the forward runs once with inputs that require grad, then only the backward is timed
(``torch.autograd.grad(y, inputs, dy, retain_graph=True)``):

    ours             the backward training runs: of the dual-stream Function (``<op>_jvp``), which is
                     Triton for LN-modulate, the gated residual, the two fused (gated_resid_ln) and
                     attention (FA2), and cuBLAS GEMMs +
                     one Triton pass (``kernels.mlp.gelu_bwd``: da, the recomputed h, db1) for the MLP
    torch            autograd through the pure-torch ``<op>_ref`` (attention: flash SDPA), eager
    torch compiled   the same under torch.compile (its generated backward)

``--device cpu`` is a dry run of this script (TRITON_INTERPRET=1, tiny shapes; timings meaningless).
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import common

SHAPES = {"gpu": dict(B=128, N=256, D=768, H=12, HIDDEN=3072), "cpu": dict(B=2, N=16, D=64, H=2, HIDDEN=128)}


def _ops(S, device, dtype):
    """(name, our forward, torch forward, inputs) per op; each forward maps the inputs to one output."""
    from meanflow_fast.kernels.attention import attention_jvp, attention_ref
    from meanflow_fast.kernels.gated_residual import gated_residual_jvp, gated_residual_ref
    from meanflow_fast.kernels.gated_residual_ln import gated_residual_ln_jvp, gated_residual_ln_ref
    from meanflow_fast.kernels.layernorm_modulate import ln_modulate_jvp, ln_modulate_ref
    from meanflow_fast.kernels.mlp import mlp_jvp, mlp_ref
    B, N, D, H, HID = S["B"], S["N"], S["D"], S["H"], S["HIDDEN"]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    def tangent(t):
        return torch.randn_like(t).detach()

    x, sh, sc, g = rand(B, N, D), rand(B, D), rand(B, D, scale=0.1), rand(B, D)
    f = rand(B, N, D)
    w1, b1, w2, b2 = rand(HID, D, scale=D ** -0.5), rand(HID), rand(D, HID, scale=HID ** -0.5), rand(D)
    q, k, v = (rand(B, N, H, D // H).transpose(1, 2) for _ in range(3))  # the DiT's (B, N, H, Dh) storage

    def sdpa(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_) if device == "cuda" else attention_ref(q_, k_, v_)
    return [
        ("ln_modulate", lambda *a: ln_modulate_jvp(*a, *map(tangent, a), 1e-6)[0],
         lambda *a: ln_modulate_ref(*a, 1e-6), (x, sh, sc)),
        ("gated_residual", lambda *a: gated_residual_jvp(*a, *map(tangent, a))[0], gated_residual_ref, (x, g, f)),
        # the fused residual + next LN: y and m both take part (the sum), as in the DiT, where y feeds the
        # next residual and m the attention or MLP
        ("gated_resid_ln", lambda *a: sum(gated_residual_ln_jvp(*a, *map(tangent, a), 1e-6)[::2]),
         lambda *a: sum(gated_residual_ln_ref(*a, 1e-6)), (x, g, f, sh, sc)),
        ("mlp", lambda *a: mlp_jvp(*a, tangent(a[0]))[0], mlp_ref, (x, w1, b1, w2, b2)),
        ("attention", lambda *a: attention_jvp(*a, *map(tangent, a))[0], sdpa, (q, k, v)),
    ]


def _backward_ms(forward, inputs, iters: int) -> float:
    y = forward(*inputs)
    dy = torch.randn_like(y)

    def run():
        torch.autograd.grad(y, inputs, dy, retain_graph=True)
    return common.cuda_time_ms(run, warmup=2, iters=iters)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the table as JSON")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    if not common.select_device(args.device, "benchmarks/tools/backward.py"):
        return 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    S = SHAPES["gpu" if args.device == "cuda" else "cpu"]
    iters = 20 if args.device == "cuda" else 2
    print(f"primal backward only, {S} {dtype} on "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu (dry run)'}", flush=True)
    print(f"{'op':<16} {'ours ms':>9} {'torch ms':>9} {'compiled ms':>12} {'ours/torch':>11} {'ours/compiled':>14}")
    rows = {}
    for name, ours, ref, inputs in _ops(S, args.device, dtype):
        t0 = time.perf_counter()
        row = {"ours_ms": _backward_ms(ours, inputs, iters), "torch_ms": _backward_ms(ref, inputs, iters)}
        try:
            row["compiled_ms"] = _backward_ms(torch.compile(ref), inputs, iters)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot compile is reported, not fatal
            row["compiled_error"] = f"{type(e).__name__}: {e}"[:200]
        comp = row.get("compiled_ms")
        print(f"{name:<16} {row['ours_ms']:9.3f} {row['torch_ms']:9.3f} "
              f"{comp if comp is not None else float('nan'):12.3f} {row['ours_ms'] / row['torch_ms']:10.2f}× "
              f"{(row['ours_ms'] / comp) if comp else float('nan'):13.2f}×   ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        rows[name] = row
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"shapes": S, "dtype": str(dtype), "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
