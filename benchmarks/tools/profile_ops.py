"""Where the time goes: the CUDA kernels of one DiT ``forward_jvp`` (triton backend) and, with
``--step``, of one MeanFlow training step, grouped by kernel name and sorted by total device time.

    PYTHONPATH=. python -m benchmarks.tools.profile_ops [--preset B/2 --batch 128] [--step] [--top 25]

The numbers are torch.profiler's per-kernel device times summed over ``--iters`` calls after two
warm-up calls (so compilation and autotuning are outside them); divide by ``--iters`` for one call.
"""
import argparse
import sys


def _table(prof, iters: int, top: int, title: str) -> None:
    rows = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    rows.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in rows)
    print(f"\n== {title}: {total / iters / 1e3:.2f} ms of kernels per call ==")
    print(f"  {'ms/call':>8} {'share':>6} {'calls':>6}  kernel")
    for e in rows[:top]:
        name = e.key if len(e.key) <= 160 else e.key[:157] + "..."
        print(f"  {e.device_time_total / iters / 1e3:8.3f} {100 * e.device_time_total / total:5.1f}% "
              f"{e.count // iters:6d}  {name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="B/2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--step", action="store_true", help="also profile one MeanFlow training step")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    if args.batch < 1 or args.iters < 1:
        p.error("--batch and --iters must be ≥ 1")
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import common
    if not common.select_device(args.device, "benchmarks/tools/profile_ops.py"):
        return 2
    if args.device == "cpu":  # a dry run of the script: nothing to time
        return 0
    cases = []
    model = common.build_model(args.preset, dtype=torch.bfloat16, backend="triton")
    inp = common.model_inputs(model, args.batch)
    cases.append(("forward_jvp triton, bf16", common.forward_jvp_fn(model, inp, "triton")))
    cases.append(("forward eager (flash SDPA), bf16", common.forward_fn(model, inp, "torch")))
    if args.step:
        fp32 = common.build_model(args.preset, dtype=torch.float32, backend="triton")
        cases.append(("MeanFlow step triton (autocast)", common.train_step_fn(fp32, args.batch, meanflow=True)))
    for title, fn in cases:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                fn()
            torch.cuda.synchronize()
        _table(prof, args.iters, args.top, f"{args.preset} b{args.batch} {title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
