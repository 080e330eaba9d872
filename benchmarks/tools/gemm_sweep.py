"""Every config of the dual-stream GEMM (meanflow_fast/kernels/linear.py) on its own at the DiT's fc1
shapes, against cuBLAS: does it run, is it right, how fast.

    PYTHONPATH=. python -m benchmarks.tools.gemm_sweep [--launch dual_gelu] [--shapes B/2,XL/2] [--extra]
                                                       [--jobs 8]

Why: fc1 of ``forward_jvp`` (both streams, the GELU/GELU' epilogue, the pre-activation stored) is the one
dual linear left on the Triton GEMM, and on the H100 the Triton GEMM ran at about 2/3 of cuBLAS's rate per
FLOP (docs/PERFORMANCE.md): 7.8 ms of the B/2 JVP, ~20 ms of the XL/2 one. The autotuner only picks among
``_CUDA_CONFIGS`` (after ``_prune_configs``); this sweep times each of them alone, and with ``--extra``
the candidates below that are not in the list (never run on a GPU: one of them could fault, which here
costs only its own process, see benchmarks/tools/sweep.py), so that the list can be changed on evidence.

``--launch``: ``dual_gelu`` (fc1 of forward_jvp), ``primal_gelu`` (fc1 of the plain forward without the
pre-activation: the no-grad guidance forward of guided training, and sampling), ``dual`` (an epilogue-free
dual launch, what the config switch ``plain_dual_linear`` sends to cuBLAS by default). Baselines, timed in
the same processes: cuBLAS for the GEMMs alone (``F.linear`` per stream, no GELU: the rate to reach), and
for ``primal_gelu`` also ``torch._addmm_activation(..., use_gelu=True)`` (cuBLASLt with its own GELU
epilogue, the tanh form). ``--device cpu`` is a dry run of the script (TRITON_INTERPRET=1, a tiny shape,
the interpreter's config). Exit status 1 when any config failed its check (FAULT, ERROR, CRASH, TIMEOUT,
or WRONG: a relative error far above the output's rounding).
"""
import argparse
import os
import sys
from typing import Dict

from benchmarks.tools.sweep import add_runner_args, check_then_time, finish, run_as_worker, run_job

LAUNCHES = ("dual_gelu", "primal_gelu", "dual")
SHAPES = {"B/2": (128 * 256, 768, 3072), "XL/2": (64 * 256, 1152, 4608)}  # fc1: (rows M, K, N)
# Sweep-only candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), beside kernels.linear._CUDA_CONFIGS
# (see the occupancy note there): deeper pipelines and 128-wide K steps, none of them spilling in the
# compile check. Their compile figures and the candidates rejected there: docs/TUNING.md.
EXTRA = [(64, 128, 64, 8, 4), (64, 256, 64, 8, 4), (64, 128, 128, 4, 3), (64, 128, 128, 8, 3)]
BASELINES = {"dual_gelu": ["cublas_gemms"], "primal_gelu": ["cublas_gemms", "cublaslt_gelu"], "dual": ["cublas_gemms"]}


def _configs(extra: bool):
    import triton
    import meanflow_fast.kernels.linear as L
    out = list(L._CUDA_CONFIGS)
    if extra:
        known = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in out}
        out += [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in EXTRA if (bm, bn, bk, w, s) not in known]
    return out


def config_label(cfg) -> str:
    kw = cfg.kwargs
    return f"BM{kw['BLOCK_M']} BN{kw['BLOCK_N']} BK{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"


def _flops(launch: str, M: int, K: int, N: int) -> float:
    return (2 if launch.startswith("dual") else 1) * 2.0 * M * K * N


def worker(job: Dict) -> Dict:
    """One (launch, shape, config or baseline) in this process: check it, and time it when job['time']."""
    import torch
    import torch.nn.functional as F
    import meanflow_fast.kernels.linear as L

    launch, (M, K, N), device = job["launch"], job["shape"], job["device"]
    dtype = getattr(torch, job["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    x, xd = (torch.randn(M, K, device=device, generator=g).to(dtype) for _ in range(2))
    w = (torch.randn(N, K, device=device, generator=g) * K ** -0.5).to(dtype)
    b = torch.randn(N, device=device, generator=g).to(dtype)
    gelu, dual = launch.endswith("gelu"), launch.startswith("dual")
    out = {}
    if "baseline" in job:
        out["label"] = job["baseline"]
        if job["baseline"] == "cublas_gemms":
            fn = (lambda: (F.linear(x, w, b), F.linear(xd, w))) if dual else (lambda: F.linear(x, w, b))
        else:  # cuBLASLt with its GELU epilogue, primal only
            def fn():
                return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    else:
        if device == "cuda":
            cfg = _configs(job["extra"])[job["config"]]
            out["label"] = config_label(cfg)
            L._CUDA_CONFIGS = [cfg]
            L._prune_configs = lambda configs, named_args, **kwargs: configs  # this config, pruned or not
            L._tuned_kernel = None
        else:
            out["label"] = "interpreter config"

        def fn():
            return L.dual_linear_fwd(x, w, b, xd if dual else None, gelu=gelu, store_pre=gelu and dual,
                                     impl=None if gelu else "triton")

    def check(got):
        got = got if isinstance(got, tuple) else (got,)
        with torch.no_grad():  # fp32 references of what fn returns
            from meanflow_fast.kernels.mlp import gelu_tanh, gelu_tanh_grad
            a, ad = F.linear(x.float(), w.float(), b.float()), F.linear(xd.float(), w.float())
            if not gelu or job.get("baseline") == "cublas_gemms":  # (the cuBLAS baseline: the GEMMs alone)
                refs = [a, ad] if dual else [a]
            else:
                refs = [gelu_tanh(a), gelu_tanh_grad(a) * ad, a] if dual else [gelu_tanh(a)]
        err = max(((t.float() - r).norm() / r.norm()).item() for t, r in zip(got, refs) if t is not None and t.numel())
        # a config that runs but computes the wrong thing (a rel. error far above the output rounding,
        # ~4e-3 in bf16) is not timed
        return dict(status="ok" if err < (2e-2 if dtype == torch.bfloat16 else 5e-3) else "WRONG", rel_err=err)
    return run_job(job, out, lambda: fn, check)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launch", default="dual_gelu", choices=LAUNCHES)
    p.add_argument("--shapes", default="B/2,XL/2", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--extra", action="store_true", help="also the sweep-only candidates (EXTRA)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    add_runner_args(p)
    args = p.parse_args(argv)
    if run_as_worker(args, worker):
        return 0
    names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in SHAPES]
    if unknown or not names or args.jobs < 1:
        p.error(f"--shapes takes names from {sorted(SHAPES)} (got {unknown or 'none'}); --jobs ≥ 1")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        shapes = {"tiny": (33, 40, 72)}
        args.dtype = "float16"  # the interpreter's bf16 dots are wrong (meanflow_fast/kernels/linear.py)
        n_configs = 1
    else:
        import torch
        if not torch.cuda.is_available():
            print("benchmarks/tools/gemm_sweep.py: no CUDA device (use --device cpu for a dry run)",
                  file=sys.stderr)
            return 2
        shapes = {s: SHAPES[s] for s in names}
        n_configs = len(_configs(args.extra))

    os.environ.setdefault("PYTHONPATH", ".")
    base = dict(launch=args.launch, dtype=args.dtype, device=args.device, extra=args.extra)
    jobs = []
    for name, shape in shapes.items():
        jobs += [dict(base, name=name, shape=shape, config=i) for i in range(n_configs)]
        if args.device == "cuda":
            jobs += [dict(base, name=name, shape=shape, baseline=bl) for bl in BASELINES[args.launch]]
    print(f"gemm sweep: {args.launch}, {args.dtype}, shapes {list(shapes)}: {len(jobs)} runs (check in "
          f"{args.jobs} processes, then time one at a time)", flush=True)
    results = check_then_time("benchmarks.tools.gemm_sweep", jobs, args.jobs, args.timeout, args.device == "cuda")

    print(f"\n{'shape':<6} {'config':<26} {'status':<7} {'rel err':>9} {'ms':>8} {'TFLOP/s':>8}")
    for r in sorted(results, key=lambda r: (r["name"], r.get("ms", float("inf")))):
        ms = r.get("ms")
        tf = _flops(args.launch, *r["shape"]) / (ms * 1e-3) / 1e12 if ms else None
        err = f"{r['rel_err']:.2e}" if "rel_err" in r else "—"
        print(f"{r['name']:<6} {r.get('label', '?'):<26} {r['status']:<7} {err:>9} {f'{ms:.4f}' if ms else '—':>8} "
              f"{f'{tf:.1f}' if tf else '—':>8}" + (f"  {r['error']}" if r.get("error") else ""))
    return finish(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
