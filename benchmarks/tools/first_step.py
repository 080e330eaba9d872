"""Seconds from a cold start to the first MeanFlow training step on the fused path (issue 5: at most
60 s of compilation and autotuning before the first step), then the steady-state step time.

    PYTHONPATH=. python -m benchmarks.tools.first_step [--preset B/2 --batch 128] [--precompile] [--compile-step]

Run it in a fresh process: it points Triton at an empty cache directory (TRITON_CACHE_DIR, set before
triton is imported), so every kernel is compiled and autotuned inside the timed first step, as on a
new machine (and inductor at an empty cache too, for ``--compile-step``). ``--device cpu`` is a dry run of
the script (TRITON_INTERPRET=1, tiny preset).
"""
import argparse
import os
import sys
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="B/2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--keep-cache", action="store_true", help="use Triton's usual cache (a warm start)")
    p.add_argument("--precompile", action="store_true",
                   help="compile every kernel variant of the step in parallel first "
                        "(meanflow_fast/kernels/precompile.py)")
    p.add_argument("--compile-step", action="store_true",
                   help="time the torch.compile'd step (inductor's compile of the whole step counts in the "
                        "first step; its cache is emptied too unless --keep-cache)")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be ≥ 1, got {args.batch}")
    if not args.keep_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")

    t_import = time.perf_counter()
    import torch

    from benchmarks import common
    if not common.select_device(args.device, "benchmarks/tools/first_step.py"):
        return 2
    model = common.build_model(args.preset, dtype=torch.float32, backend="triton")
    step = common.train_step_fn(model, args.batch, meanflow=True, compiled=args.compile_step)
    setup_s = time.perf_counter() - t_import
    pre = None
    if args.precompile:
        from meanflow_fast.kernels.precompile import precompile
        pre = precompile(common.train_step_fn(model, args.batch, meanflow=True, grads_only=True))
    first_s = common.timed_first_call(step)
    steady_ms = common.cuda_time_ms(step, warmup=1, iters=5)
    cache = "warm (Triton's cache)" if args.keep_cache else f"cold ({os.environ['TRITON_CACHE_DIR']})"
    precision = "fp32 master weights + bf16 autocast" if args.device == "cuda" else "fp32 (CPU dry run)"
    mode = "torch.compile'd step" if args.compile_step else "eager step"
    print(f"MeanFlow step, {args.preset} batch {args.batch}, {precision}, backend triton, {mode}, {cache}:")
    print(f"  imports + model build   {setup_s:7.1f} s")
    if pre is not None:
        print(f"  precompile              {pre.seconds:7.1f} s   ({pre})")
    print(f"  first step              {first_s:7.1f} s   (compilation + autotuning + one step"
          f"{'; inductor included' if args.compile_step else ''})")
    print(f"  steady step             {steady_ms:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
