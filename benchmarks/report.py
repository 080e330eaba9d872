"""Print the ratio table of the must-show cases (one run, one GPU) and write it as JSON.

    PYTHONPATH=. python -m benchmarks.report --out results.json [--quick]

Every ratio is measured in this run on this GPU against the baselines of the same model and batch:
eager PyTorch (flash SDPA) and torch.compile'd PyTorch. The JVP row follows the two forward baselines at
once, each ratio is printed as soon as its rows exist, and the JSON is rewritten after every row, so a
run cut short by its time limit keeps what it measured; ``--skip`` leaves optional rows out.

The iMF model (meanflow_fast/imf) has its own table, selected by the ``iMF-`` prefix of a case:

    PYTHONPATH=. python -m benchmarks.report --sampler no --cases iMF-B/2:128,iMF-XL/2:64

with the issue's targets printed beside its ratios (``IMF_TARGETS``).
"""
import argparse
import json
import os
import re
import sys

import torch

from benchmarks import common
from benchmarks.common import (CASES, IMF_PREFIX, build_imf_model, build_model, cuda_time_ms, dit_forward_flops,
                               dit_jvp_flops, forward_fn, forward_jvp_fn, func_jvp_fn, imf_forward_flops,
                               imf_forward_fn, imf_forward_jvp_fn, imf_func_jvp_fn, imf_inputs, imf_jvp_flops,
                               imf_train_step_fn, model_inputs, peak_memory_mb, timed_first_call, train_step_fn)


def _measure(name, fn, rows, flops=None, iters=10):
    # A CPU dry run checks the script, not the figures: one timed call (the Triton interpreter is slow).
    warmup, iters = (2, iters) if common.DEVICE == "cuda" else (0, 1)
    try:
        first_s = timed_first_call(fn)
        ms = cuda_time_ms(fn, warmup=warmup, iters=iters)
        mem = peak_memory_mb(fn)
    except Exception as e:  # a baseline that cannot run (e.g. OOM) is reported, not fatal
        print(f"  {name:<28} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        return None
    row = {"ms": round(ms, 2), "peak_mb": round(mem), "first_call_s": round(first_s, 1)}
    if flops:
        row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
    rows[name] = row
    print(f"  {name:<28} {ms:9.2f} ms  {row.get('tflops', ''):>7} TFLOP/s  {mem:8.0f} MB  "
          f"first call {first_s:6.1f} s", flush=True)
    return ms


def _ratio(rows, key, num, den, num_key="ms", target=None):
    """rows[key] = rows[num][num_key] / rows[den][num_key], printed, when both rows were measured; with a
    ``target`` (an upper bound) printed beside it, met or missed; without both rows, the target is printed
    as not measured."""
    a, b = rows.get(num, {}).get(num_key), rows.get(den, {}).get(num_key)
    goal = "" if target is None else f"  target ≤ {target:.2f}×"
    if a and b:
        rows[key] = round(a / b, 3)
        verdict = "" if target is None else (": met" if rows[key] <= target else ": MISSED")
        print(f"  {key:<36} {rows[key]:.3f}×{goal}{verdict}", flush=True)
    elif target is not None:
        print(f"  {key:<36} —  {goal.strip()}: not measured (no {num_key} of {num!r} or {den!r})", flush=True)


# The rows a model table can leave out (--skip): none of them enters a must-show ratio.
OPTIONAL_ROWS = ("forward triton", "forward_jvp torch", "torch.func.jvp eager", "FM step eager",
                 "MeanFlow step triton compiled", "torch.func.jvp compiled", "iMF step triton compiled")

# The targets of the iMF table (upper bounds of the ratios): the JVP against the forward with both
# heads, eager and compiled; the iMF step against the compiled flow-matching step of the same network.
IMF_TARGETS = {"jvp_over_eager_forward": 1.0, "jvp_over_compiled_forward": 2.0,
               "imf_step_over_compiled_fm": 1.35, "imf_mem_over_compiled_fm": 1.1}


def _row_key(name: str) -> str:
    """A row's name with spaces, '_' and '-' alike, so that --skip takes names without spaces."""
    return re.sub(r"[ _-]+", "-", name.strip().lower())


class _Table:
    """One model table as it is measured: ``measure`` times a row unless it is skipped, ``ratio`` adds a
    ratio once both its rows exist (with its target from ``targets``, if any, printed beside it), and each
    writes the rows through ``save`` at once, so that a run cut short by its time limit still has them.
    Skipped: the rows of ``skip``, the eager torch.func.jvp row when ``quick``, ``compiled_step_row``
    without ``compiled_step``. ``rows``: the dict to fill (the caller's, so that ``save`` writes what is
    measured so far)."""

    def __init__(self, title, rows, save, skip, quick, compiled_step, compiled_step_row, targets=None):
        print(f"\n== {title} ==", flush=True)
        self.rows = {} if rows is None else rows
        self.skip = set(skip) | ({"torch.func.jvp eager"} if quick else set()) \
            | (set() if compiled_step else {compiled_step_row})
        self.save = save if save is not None else (lambda: None)
        self.targets = targets or {}

    def measure(self, name, fn, flops=None, iters=10):
        if name not in self.skip:
            _measure(name, fn, self.rows, flops, iters)
            self.save()

    def ratio(self, key, num, den, num_key="ms"):
        _ratio(self.rows, key, num, den, num_key, target=self.targets.get(key))
        self.save()

    def forward_rows(self, model, make, fwd, jvp):
        """The forward rows of ``model``: the forward baselines (eager, compiled), at once ``forward_jvp`` on
        triton and its ratios, then the optional rows; the compiled torch.func.jvp row only where ``make``
        has it. ``make``: row name → a function of the model that builds the row's timed call (built where
        the row is reached, skipped or not); ``fwd``, ``jvp``: the FLOPs of one forward and of one JVP."""
        self.measure("forward eager", make["forward eager"](model), fwd)
        self.measure("forward compiled", make["forward compiled"](model), fwd)
        self.measure("forward_jvp triton", make["forward_jvp triton"](model), jvp)
        self.ratio("jvp_over_eager_forward", "forward_jvp triton", "forward eager")
        self.ratio("jvp_over_compiled_forward", "forward_jvp triton", "forward compiled")
        if "torch.func.jvp compiled" in make:
            # torch.compile of torch.func.jvp over the plain forward: what a user gets from PyTorch alone.
            self.measure("torch.func.jvp compiled", make["torch.func.jvp compiled"](model), jvp)
            self.ratio("jvp_over_compiled_func_jvp", "forward_jvp triton", "torch.func.jvp compiled")
        # The plain forward on the fused primal-only kernels (cuBLAS linears, flash SDPA): where this ratio
        # is < 1 the fused forward is the faster one.
        self.measure("forward triton", make["forward triton"](model), fwd)
        self.ratio("triton_forward_over_eager_forward", "forward triton", "forward eager")
        self.ratio("triton_forward_over_compiled_forward", "forward triton", "forward compiled")
        self.measure("forward_jvp torch", make["forward_jvp torch"](model), jvp)
        self.measure("torch.func.jvp eager", make["torch.func.jvp eager"](model), jvp)

    def step_rows(self, build, step_fn, steps):
        """The train-step rows (fp32 master weights, bf16 autocast) in the order and with the frees of the
        first H100 run's table (the memory ratio depends on what is alive): the flow-matching step on
        ``build()``, eager (cheap) before compiled; then each (row name, compiled, ratio key) of ``steps``
        on ``build(backend="triton")`` with its time and peak-memory ratios over the FM steps.
        ``step_fn(model, own, compiled)`` builds one step: of the model's own loss (``own`` True) or of
        the flow-matching loss."""
        print("  -- train step (fp32 master weights, bf16 autocast) --", flush=True)
        fm = build()
        self.measure("FM step eager", step_fn(fm, False, False), iters=5)
        self.measure("FM step compiled", step_fn(fm, False, True), iters=5)
        del fm
        model = build(backend="triton")
        for name, compiled, key in steps:
            if name in self.skip:
                continue
            if compiled:
                torch._dynamo.reset()
            self.measure(name, step_fn(model, True, compiled), iters=5)
            self.ratio(f"{key}_step_over_compiled_fm", name, "FM step compiled")
            self.ratio(f"{key}_mem_over_compiled_fm", name, "FM step compiled", num_key="peak_mb")
            self.ratio(f"{key}_step_over_eager_fm", name, "FM step eager")
        torch.cuda.empty_cache()


def model_table(preset, batch, quick, dtype, compiled_step=True, skip=(), rows=None, save=None):
    """The ratio table of one (preset, batch). The JVP row follows the two forward baselines at once (the
    optional forward rows after it), and each ratio is printed (and, through ``save``, written) as soon as
    its rows exist, so that a run cut short by its time limit still has them. ``skip``: rows of
    OPTIONAL_ROWS to leave out. ``rows``: the dict to fill (the caller's, so that ``save`` writes what is
    measured so far)."""
    table = _Table(f"{preset} batch {batch} ({dtype})", rows, save, skip, quick, compiled_step,
                   "MeanFlow step triton compiled")
    model = build_model(preset, dtype=dtype)
    inp = model_inputs(model, batch, dtype=dtype)
    table.forward_rows(model, {"forward eager": lambda m: forward_fn(m, inp, "torch"),
                               "forward compiled": lambda m: forward_fn(torch.compile(m), inp, "torch"),
                               "forward_jvp triton": lambda m: forward_jvp_fn(m, inp, "triton"),
                               "forward triton": lambda m: forward_fn(m, inp, "triton"),
                               "forward_jvp torch": lambda m: forward_jvp_fn(m, inp, "torch"),
                               "torch.func.jvp eager": lambda m: func_jvp_fn(m, inp)},
                       dit_forward_flops(preset, batch), dit_jvp_flops(preset, batch))
    del model
    # The MeanFlow step compiled as the FM baseline is: inductor fuses what lies between the custom ops
    # (adaLN, embedders, loss, bf16 weight casts, gradient sums) and the Adam update. first_call_s
    # includes inductor's compile time.
    table.step_rows(lambda **kw: build_model(preset, dtype=torch.float32, **kw),
                    lambda m, own, compiled: train_step_fn(m, batch, meanflow=own, compiled=compiled),
                    (("MeanFlow step triton", False, "mf"), ("MeanFlow step triton compiled", True, "mf_compiled")))
    return table.rows


def imf_table(preset, batch, quick, dtype, compiled_step=True, skip=(), rows=None, save=None):
    """The ratio table of one iMF (preset, batch), laid out as ``model_table``'s: the forward baselines
    (both heads, torch ops: eager and torch.compile'd), then at once ``forward_jvp`` on the triton backend
    and its ratios, then the optional rows; then the steps: the flow-matching step of the same network
    (``common.imf_fm_loss``: v-head only; eager, compiled) and the iMF step (IMFLoss + backward + Adam) on
    the triton backend (eager, compiled), with the step time and peak-memory ratios. The targets of
    ``IMF_TARGETS`` are printed beside their ratios and stored under ``rows["targets"]``. A row whose
    backend cannot run (IMFDiT without its triton backend raises NotImplementedError) is reported as
    FAILED with the reason, and the ratios it enters as not measured."""
    table = _Table(f"{IMF_PREFIX}{preset} batch {batch} ({dtype})", rows, save, skip, quick, compiled_step,
                   "iMF step triton compiled", targets=IMF_TARGETS)
    table.rows["targets"] = dict(IMF_TARGETS)
    model = build_imf_model(preset, dtype=dtype)
    inp = imf_inputs(model, batch, dtype=dtype)
    table.forward_rows(model, {"forward eager": lambda m: imf_forward_fn(m, inp, "torch"),
                               "forward compiled": lambda m: imf_forward_fn(torch.compile(m), inp),
                               "forward_jvp triton": lambda m: imf_forward_jvp_fn(m, inp, "triton"),
                               "torch.func.jvp compiled": lambda m: torch.compile(imf_func_jvp_fn(m, inp)),
                               "forward triton": lambda m: imf_forward_fn(m, inp, "triton"),
                               "forward_jvp torch": lambda m: imf_forward_jvp_fn(m, inp, "torch"),
                               "torch.func.jvp eager": lambda m: imf_func_jvp_fn(m, inp)},
                       imf_forward_flops(preset, batch), imf_jvp_flops(preset, batch))
    del model
    table.step_rows(lambda **kw: build_imf_model(preset, dtype=torch.float32, **kw),
                    lambda m, own, compiled: imf_train_step_fn(m, batch, imf=own, compiled=compiled),
                    (("iMF step triton", False, "imf"), ("iMF step triton compiled", True, "imf_compiled")))
    return table.rows


def parse_cases(values):
    """``--cases`` values, each one or more comma-separated ``preset:batch`` pairs, as (preset, batch)
    pairs; an ``iMF-`` preset names an iMF model. Raises ValueError naming a malformed pair."""
    cases = []
    for v in values:
        for c in (c.strip() for c in v.split(",")):
            if not c:
                continue
            preset, _, batch = c.rpartition(":")
            if not preset or not batch.isdigit() or int(batch) < 1:
                raise ValueError(f"--cases: {c!r} is not preset:batch (e.g. B/2:128 or {IMF_PREFIX}B/2:128, "
                                 "batch a positive integer)")
            cases.append((preset, int(batch)))
    return cases


def sampler_table(dtype, preset="B/2", batches=(1, 256)):
    """1-NFE DiT-B/2 sampling (bf16): batch-1 latency and batch-256 throughput, graph vs eager vs compiled,
    and the graph over the same weights with backend="triton" (the fused primal kernels)."""
    from meanflow_fast import sample
    from meanflow_fast.graph_sampler import GraphSampler
    print(f"\n== sampler 1-NFE, {preset} ({dtype}) ==", flush=True)
    rows = {}
    model = build_model(preset, dtype=dtype).eval()
    c = model.config
    compiled = torch.compile(model)
    fused = build_model(preset, dtype=dtype, backend="triton").eval()  # same seed: the same weights
    for batch in batches:
        y = torch.randint(0, c.num_classes, (batch,), device=common.DEVICE)
        noise = torch.randn(batch, c.in_channels, c.input_size, c.input_size, device=common.DEVICE, dtype=dtype)
        graph = GraphSampler(model)
        eager = _measure(f"b{batch} eager", lambda: sample(model, y, noise=noise), rows)
        _measure(f"b{batch} compiled", lambda: sample(compiled, y, noise=noise), rows)
        g = _measure(f"b{batch} cuda graph", lambda: graph(y, noise), rows)
        if eager and g:
            rows[f"b{batch}_graph_over_eager"] = round(g / eager, 3)
            print(f"  b{batch} graph / eager time       {g / eager:.3f}×  (throughput {eager / g:.2f}×)", flush=True)
        graph_fused = GraphSampler(fused)
        gf = _measure(f"b{batch} cuda graph triton", lambda: graph_fused(y, noise), rows)
        if eager and gf:
            rows[f"b{batch}_graph_triton_over_eager"] = round(gf / eager, 3)
            print(f"  b{batch} graph triton / eager     {gf / eager:.3f}×  (throughput {eager / gf:.2f}×)",
                  flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmark_results.json")
    p.add_argument("--quick", action="store_true", help="skip the slow eager torch.func.jvp baseline")
    p.add_argument("--cases", nargs="*", default=[f"{c}:{b}" for c, b in CASES],
                   help="preset:batch pairs, space- or comma-separated (default: the must-show DiT cases); "
                        f"{IMF_PREFIX}PRESET:BATCH for the iMF table (e.g. {IMF_PREFIX}B/2:128,{IMF_PREFIX}XL/2:64)")
    p.add_argument("--sampler", choices=["yes", "no", "only"], default="yes",
                   help="the 1-NFE sampler table: with the model tables, without it, or alone")
    p.add_argument("--no-compiled-step", dest="compiled_step", action="store_false",
                   help="skip the torch.compile'd MeanFlow step row (its first call compiles the whole step)")
    p.add_argument("--skip", default="", metavar="ROW[,ROW...]",
                   help="optional rows to leave out of the model tables, comma-separated; '-' may stand for "
                        f"spaces and underscores (forward-jvp-torch): {', '.join(OPTIONAL_ROWS)}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of this script only (fp32, TRITON_INTERPRET=1, tiny presets)")
    args = p.parse_args(argv)
    by_key = {_row_key(r): r for r in OPTIONAL_ROWS}
    asked = [r.strip() for r in args.skip.split(",") if r.strip()]
    unknown = [r for r in asked if _row_key(r) not in by_key]
    if unknown:
        p.error(f"--skip: unknown or required row(s) {unknown}; the optional rows are {list(OPTIONAL_ROWS)}")
    skip = [by_key[_row_key(r)] for r in asked]
    try:
        cases = parse_cases(args.cases)
    except ValueError as e:
        p.error(str(e))
    from meanflow_fast.imf import IMF_PRESETS
    bad = [p_ for p_, _ in cases if p_.startswith(IMF_PREFIX) and p_[len(IMF_PREFIX):] not in IMF_PRESETS]
    if bad:
        p.error(f"--cases: unknown iMF preset(s) {bad}; allowed: {[IMF_PREFIX + k for k in IMF_PRESETS]}")
    if args.device == "cpu" and args.sampler != "no" and (not cases or cases[0][0].startswith(IMF_PREFIX)):
        p.error(f"--sampler: a dry run's sampler table takes its DiT preset from the first of --cases; put a DiT "
                f"case first or pass --sampler no (iMF cases: {IMF_PREFIX}PRESET:BATCH)")
    if not common.select_device(args.device, "benchmarks/report.py"):
        return 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run, timings meaningless)"
    out = {"device": name, "torch": torch.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass

    def save():  # after every row: a run killed by its time limit keeps what it measured
        with open(args.out + ".tmp", "w") as f:
            json.dump(out, f, indent=2)
        os.replace(args.out + ".tmp", args.out)

    for preset, batch in (cases if args.sampler != "only" else []):
        out[f"{preset} b{batch}"] = rows = {}
        if preset.startswith(IMF_PREFIX):
            imf_table(preset[len(IMF_PREFIX):], batch, args.quick, dtype, args.compiled_step, skip, rows, save)
        else:
            model_table(preset, batch, args.quick, dtype, args.compiled_step, skip, rows, save)
    if args.sampler == "no":
        pass
    elif args.device == "cuda":
        out["sampler"] = sampler_table(dtype)
    else:
        out["sampler"] = sampler_table(dtype, preset=cases[0][0], batches=(1, 4))
    save()
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
