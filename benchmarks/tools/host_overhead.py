"""Host time of the model's calls apart from any kernel: what the Python side of a backend costs per call.

    python -m benchmarks.tools.host_overhead [--preset B/2] [--calls forward,forward_jvp,mf_step,fm_step]
                                             [--backends triton,torch] [--profile forward_jvp]

CPU only, in a fresh process: Triton's interpreter with every kernel launch stubbed to a no-op (so a
launch costs its launcher's Python and Triton's argument handling, not the interpreter's run), and a DiT
with the preset's depth (its op count) at hidden 128, 4 heads and 2×2 latents (4 tokens), batch 1, so that
torch's own CPU ops (the cuBLAS GEMMs on a GPU) cost next to nothing. The outputs are garbage; the time is
the host's. Best and median of ``--reps`` batches of ``--calls-per-rep`` calls, after 3 warm-up calls.

Calls: ``forward`` (no grad: sampling, the guidance term), ``forward_jvp`` (no grad), ``mf_step`` (the
guided MeanFlowLoss of the B/2 preset, ω 1, κ 0.5, and its backward), ``fm_step`` (plain forward + MSE +
backward: an eager flow-matching step). On a GPU these are what the host spends while the GPU runs; a
step is host-bound when this exceeds the GPU's time (docs/PERFORMANCE.md, "Host time per call").
"""
import argparse
import os
import sys
import time

CALLS = ("forward", "forward_jvp", "mf_step", "fm_step")
BACKENDS = ("triton", "torch")


def _stub_launches() -> None:
    """Every Triton launch returns at once (the interpreter's run of a kernel is replaced by a no-op)."""
    import triton.runtime.interpreter as interp
    interp.InterpretedFunction.run = lambda self, *args, **kwargs: None


def _call_fn(name: str, model, backend: str):
    import torch
    from meanflow_fast.loss import MeanFlowLoss
    from meanflow_fast.model import skip_value_checks
    c = model.config
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, c.in_channels, c.input_size, c.input_size, generator=g)
    y = torch.randint(0, c.num_classes, (1,), generator=g)
    t = torch.rand(1, generator=g)
    r, dz = t * 0.5, torch.randn_like(z)
    loss_fn = MeanFlowLoss(c.num_classes, omega=1.0, kappa=0.5)

    # The direct model calls skip their value checks (valid draws), as the loss's calls do: a host sync
    # per call is no part of the backend's host time.
    def forward():
        with torch.no_grad(), skip_value_checks():
            model(z, r, t, y, backend=backend)

    def forward_jvp():
        with torch.no_grad(), skip_value_checks():
            model.forward_jvp(z, r, t, y, dz, backend=backend)

    def mf_step():
        model.backend = backend
        loss, _ = loss_fn(model, z, y, generator=g)
        loss.backward()

    def fm_step():
        with skip_value_checks():
            ((model(z, r, t, y, backend=backend) - dz) ** 2).mean().backward()
    return {"forward": forward, "forward_jvp": forward_jvp, "mf_step": mf_step, "fm_step": fm_step}[name]


def measure(fn, reps: int, per_rep: int):
    """(best, median) ms per call over ``reps`` batches of ``per_rep`` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(per_rep):
            fn()
        times.append((time.perf_counter() - t0) / per_rep * 1e3)
    times.sort()
    return times[0], times[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="B/2", help="its depth sets the op count (default B/2)")
    p.add_argument("--calls", default=",".join(CALLS), help=f"comma-separated, of {', '.join(CALLS)}")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of triton, torch")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--calls-per-rep", type=int, default=10)
    p.add_argument("--profile", default=None, metavar="CALL",
                   help="also print the top of a cProfile of this call (triton backend)")
    args = p.parse_args(argv)
    calls, backends = args.calls.split(","), args.backends.split(",")
    for name, got, allowed in (("--calls", calls, CALLS), ("--backends", backends, BACKENDS)):
        bad = [x for x in got if x not in allowed]
        if bad:
            p.error(f"{name}: unknown {bad}; allowed: {', '.join(allowed)}")
    if args.profile is not None and args.profile not in CALLS:
        p.error(f"--profile must be one of {', '.join(CALLS)}, got {args.profile!r}")
    if args.reps < 1 or args.calls_per_rep < 1:
        p.error("--reps and --calls-per-rep must be >= 1")
    if "meanflow_fast.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("run in a fresh process: TRITON_INTERPRET=1 must be set before meanflow_fast.kernels is imported")
    os.environ["TRITON_INTERPRET"] = "1"

    import torch
    _stub_launches()
    from meanflow_fast import meanflow_dit
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = meanflow_dit(args.preset, input_size=2, hidden_size=128, num_heads=4)
    print(f"host time per call, {args.preset} op count ({model.config.depth} blocks), Triton launches stubbed, "
          f"best / median of {args.reps} × {args.calls_per_rep} calls, torch {torch.__version__}:")
    for name in calls:
        for backend in backends:
            best, med = measure(_call_fn(name, model, backend), args.reps, args.calls_per_rep)
            print(f"  {name:<12} {backend:<7} {best:8.2f} ms  (median {med:.2f})")
    if args.profile:
        import cProfile
        import pstats
        fn = _call_fn(args.profile, model, "triton")
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls_per_rep):
            fn()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
