"""Every autotune config of an attention kernel on its own: does it run, is it right, how fast is it.

    PYTHONPATH=. python -m benchmarks.tools.attention_sweep [--kernel fwd_tangent] [--dims 64,72] [--hi 16,64]
                                                            [--shape 64,16,256] [--extra] [--jobs 8]

Why: the autotuner launches every candidate of its list at the first call of a new shape, so one that
faults (an illegal memory access, a compiler bug: docs/TUNING.md) kills the process, and one that is never
the fastest only costs compile time. This script runs each config alone (the autotuner's list set
to that one config) in its own process, so a fault is reported for that config and the sweep goes on:

  1. in parallel (``--jobs`` processes): compile, run once, compare O (and Ȯ, or dQ, dK, dV) with the
     fp32 reference: ``ok`` with the max abs error, ``FAULT`` (a CUDA error), or ``ERROR``;
  2. one process after another (so that timings do not overlap): the median time of the configs that ran
     (``triton.testing.do_bench``), and TFLOP/s (forward 4·B·H·N²·D, forward + tangent 3× that, backward
     2.5× the forward: dQ, dK, dV and the recomputed S and P).

``--kernel``: ``fwd`` (primal forward), ``fwd_tangent`` (forward with Ȯ), ``dkdv`` or ``dq`` (the backward
with that kernel's config varied, the other one at its first config). ``--hi`` overrides the width of the
high head-dim chunk when D is not a power of 2 (meanflow_fast/kernels/attention.py cuts D = 72 into
64 + 16; 32 pads the high chunk to 64 + 32; 64 to 64 + 64, one wgmma layout for both chunks at 1.6× the
P·V work), to measure that choice; ``--extra`` adds the sweep-only candidates of ``EXTRA`` to a forward
kernel's list; ``--dims`` may name dims outside the supported list (e.g. 80: 64 + 16 without a column
mask) for the same purpose. ``--device cpu`` is a dry run of the script (TRITON_INTERPRET=1, a tiny
shape, the interpreter's single config; no timing). Exit status 1 when any config failed its check.
"""
import argparse
import os
import sys
from typing import Dict

from benchmarks.tools.sweep import add_runner_args, check_then_time, finish, run_as_worker, run_job

KERNELS = ("fwd", "fwd_tangent", "dkdv", "dq")
# Sweep-only forward candidates (BLOCK_M, BLOCK_N, warps, stages), beside kernels.attention._FWD_CONFIGS:
# (64, 32, 8, 3) faulted at D 72 with tangent before the stride alignment hint (does it still?); the other
# two are 8-warp, 3-stage versions of listed tiles. Their compile figures: docs/TUNING.md.
EXTRA = [(64, 32, 8, 3), (64, 64, 8, 3), (128, 64, 8, 3)]


def _flops(kernel: str, B: int, H: int, N: int, D: int) -> float:
    fwd = 4.0 * B * H * N * N * D
    return {"fwd": fwd, "fwd_tangent": 3 * fwd, "dkdv": 2.5 * fwd, "dq": 2.5 * fwd}[kernel]


def _autotuner(A, kernel: str):
    return {"fwd": A._attn_fwd_jvp_kernel, "fwd_tangent": A._attn_fwd_jvp_kernel,
            "dkdv": A._attn_bwd_dkdv_kernel, "dq": A._attn_bwd_dq_kernel}[kernel]


def _configs(A, kernel: str, extra: bool):
    """The kernel's autotune list, plus ``EXTRA`` for the forward kernels when asked (on a GPU: the
    interpreter's list is its one fixed config)."""
    import triton
    out = list(_autotuner(A, kernel).configs)
    if extra and kernel in ("fwd", "fwd_tangent") and not A._INTERPRET:
        known = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in out}
        out += [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                for m, n, w, st in EXTRA if (m, n, w, st) not in known]
    return out


def config_label(cfg) -> str:
    """A Triton attention config as "BM64 BN32 w4 s3" (also the attention benchmark's table column)."""
    kw = cfg.kwargs
    return f"BM{kw['BLOCK_M']} BN{kw['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def worker(job: Dict) -> Dict:
    """One (kernel, D, hi, config) in this process: check it, and time it when job['time'] is set."""
    import torch
    import meanflow_fast.kernels.attention as A

    kernel, D, hi, index = job["kernel"], job["D"], job["hi"], job["config"]
    device = job["device"]
    if D not in A.SUPPORTED_HEAD_DIMS:  # a diagnostic dim (e.g. 80): let the launchers take it
        A.SUPPORTED_HEAD_DIMS = tuple(sorted(set(A.SUPPORTED_HEAD_DIMS) | {D}))
    chunks = A._head_dim_chunks
    if hi is not None:
        A._head_dim_chunks = lambda d: {**chunks(d), "BLOCK_DHI": hi} if chunks(d)["SPLIT"] else chunks(d)
    tuner = _autotuner(A, kernel)
    cfg = _configs(A, kernel, job["extra"])[index]
    tuner.configs = [cfg]
    if kernel in ("dkdv", "dq"):  # the other backward kernel at its first config: no autotuning in the timing
        other = A._attn_bwd_dq_kernel if kernel == "dkdv" else A._attn_bwd_dkdv_kernel
        other.configs = other.configs[:1]

    B, H, N = job["shape"]
    dtype = getattr(torch, job["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, qd, kd, vd, do = (torch.randn(B, H, N, D, device=device, generator=g).to(dtype) for _ in range(7))

    def prepare():
        if kernel == "fwd":
            return lambda: A.attention_fwd(q, k, v)
        if kernel == "fwd_tangent":
            return lambda: A.attention_fwd(q, k, v, qd, kd, vd)
        o, _, lse = A.attention_fwd(q, k, v)
        return lambda: A.attention_bwd(do, q, k, v, o, lse)

    def check(got):
        if device == "cuda":
            torch.cuda.synchronize()
        f32 = [t.float() for t in (q, k, v, qd, kd, vd)]
        if kernel in ("fwd", "fwd_tangent"):
            ref_o, ref_od = A.attention_jvp_ref(*f32)
            errs = [(got[0].float() - ref_o).abs().max().item()]
            if kernel == "fwd_tangent":
                errs.append((got[1].float() - ref_od).abs().max().item())
        else:
            leaves = [t.requires_grad_() for t in f32[:3]]
            A.attention_ref(*leaves).backward(do.float())
            errs = [(a.float() - t.grad).abs().max().item() for a, t in zip(got, leaves)]
        return dict(status="ok", max_err=max(errs))
    return run_job(job, {"label": config_label(cfg)}, prepare, check)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", default="fwd_tangent", choices=KERNELS)
    p.add_argument("--dims", default="64,72", help="head dims, comma-separated")
    p.add_argument("--hi", default="", help="high-chunk widths to try for non-power-of-2 dims, e.g. 16,32 "
                                           "(default: the kernels' own choice)")
    p.add_argument("--shape", default="64,16,256", help="B,H,N (default: DiT-XL/2 batch 64)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--extra", action="store_true", help="also the sweep-only forward candidates (EXTRA)")
    add_runner_args(p)
    args = p.parse_args(argv)
    if run_as_worker(args, worker):
        return 0

    try:
        dims = [int(d) for d in args.dims.split(",") if d]
        his = [int(h) for h in args.hi.split(",") if h] or [None]
        shape = [int(s) for s in args.shape.split(",")]
    except ValueError:
        p.error(f"--dims, --hi and --shape take comma-separated integers, got {args.dims!r}, {args.hi!r}, "
                f"{args.shape!r}")
    if len(shape) != 3 or min(shape) < 1 or args.jobs < 1 or not dims:
        p.error("--shape must be B,H,N (each ≥ 1), --jobs ≥ 1, --dims not empty")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        shape = [1, 2, 33]
        if args.dtype == "bfloat16":
            args.dtype = "float32"  # the interpreter's bf16 dots are wrong (meanflow_fast/kernels/attention.py)
    else:
        import torch
        if not torch.cuda.is_available():
            print("benchmarks/tools/attention_sweep.py: no CUDA device (use --device cpu for a dry run)",
                  file=sys.stderr)
            return 2

    os.environ.setdefault("PYTHONPATH", ".")
    import meanflow_fast.kernels.attention as A
    n_configs = len(_configs(A, args.kernel, args.extra))
    groups = [(D, hi) for D in dims for hi in (his if D & (D - 1) else [None])]  # --hi only where D splits
    base = dict(kernel=args.kernel, shape=shape, dtype=args.dtype, device=args.device, extra=args.extra)
    jobs = [dict(base, D=D, hi=hi, config=i) for D, hi in groups for i in range(n_configs)]
    print(f"attention sweep: {args.kernel}, B,H,N = {shape}, {args.dtype}, dims {dims}, high chunk "
          f"{[h for h in his if h] or 'default'}: {len(jobs)} runs (check in {args.jobs} processes, then time "
          f"one at a time)", flush=True)
    results = check_then_time("benchmarks.tools.attention_sweep", jobs, args.jobs, args.timeout, args.device == "cuda")

    print(f"\n{'D':>4} {'hi':>4} {'config':<20} {'status':<7} {'max err':>9} {'ms':>8} {'TFLOP/s':>8}")
    for r in sorted(results, key=lambda r: (r["D"], r["hi"] or 0, r.get("ms", float("inf")))):
        ms = r.get("ms")
        tf = _flops(args.kernel, *shape, r["D"]) / (ms * 1e-3) / 1e12 if ms else None
        err = f"{r['max_err']:.2e}" if "max_err" in r else "—"
        print(f"{r['D']:>4} {str(r['hi'] or '-'):>4} {r.get('label', '?'):<20} {r['status']:<7} {err:>9} "
              f"{f'{ms:.4f}' if ms else '—':>8} {f'{tf:.1f}' if tf else '—':>8}"
              + (f"  {r['error']}" if r.get("error") else ""))
    return finish(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
