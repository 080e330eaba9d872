"""Print the ratio table of the must-show cases (one run, one GPU) and write it as JSON.

    PYTHONPATH=. python -m benchmarks.report --out results.json [--quick]

Every ratio is measured in this run on this GPU against the baselines of the same model and batch:
eager PyTorch (flash SDPA) and torch.compile'd PyTorch.
"""
import argparse
import json
import sys

import torch

from benchmarks import common
from benchmarks.common import (CASES, build_model, cuda_time_ms, dit_forward_flops, dit_jvp_flops, forward_fn,
                               forward_jvp_fn, func_jvp_fn, model_inputs, peak_memory_mb, timed_first_call,
                               train_step_fn)


def _measure(name, fn, rows, flops=None, iters=10):
    try:
        first_s = timed_first_call(fn)
        ms = cuda_time_ms(fn, warmup=2, iters=iters)
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


def _step_ratios(rows, name, key, ms, fm_comp, fm_eager):
    """Time and peak-memory ratios of the step row ``name`` to the FM steps (keys ``<key>_step_over_...``)."""
    if ms and fm_comp:
        rows[f"{key}_step_over_compiled_fm"] = round(ms / fm_comp, 3)
        if rows["FM step compiled"]["peak_mb"] > 0:
            rows[f"{key}_mem_over_compiled_fm"] = round(rows[name]["peak_mb"] / rows["FM step compiled"]["peak_mb"], 3)
    if ms and fm_eager:
        rows[f"{key}_step_over_eager_fm"] = round(ms / fm_eager, 3)


def model_table(preset, batch, quick, dtype, compiled_step=True):
    print(f"\n== {preset} batch {batch} ({dtype}) ==", flush=True)
    rows = {}
    model = build_model(preset, dtype=dtype)
    inp = model_inputs(model, batch, dtype=dtype)
    fwd, jvp = dit_forward_flops(preset, batch), dit_jvp_flops(preset, batch)
    base = _measure("forward eager", forward_fn(model, inp, "torch"), rows, fwd)
    comp = _measure("forward compiled", forward_fn(torch.compile(model), inp, "torch"), rows, fwd)
    # The plain forward on the fused primal-only kernels (LN-modulate, gated residual, fc1 + GELU; cuBLAS
    # linears, flash SDPA): where this ratio is < 1 the fused forward is the faster one.
    fwd_triton = _measure("forward triton", forward_fn(model, inp, "triton"), rows, fwd)
    if fwd_triton and base:
        rows["triton_forward_over_eager_forward"] = round(fwd_triton / base, 3)
    if fwd_triton and comp:
        rows["triton_forward_over_compiled_forward"] = round(fwd_triton / comp, 3)
    if not quick:
        _measure("torch.func.jvp eager", func_jvp_fn(model, inp), rows, jvp)
    ours = _measure("forward_jvp triton", forward_jvp_fn(model, inp, "triton"), rows, jvp)
    _measure("forward_jvp torch", forward_jvp_fn(model, inp, "torch"), rows, jvp)
    if ours and base:
        rows["jvp_over_eager_forward"] = round(ours / base, 3)
    if ours and comp:
        rows["jvp_over_compiled_forward"] = round(ours / comp, 3)
    del model
    print("  -- train step (fp32 master weights, bf16 autocast) --", flush=True)
    fm = build_model(preset, dtype=torch.float32)
    fm_eager = _measure("FM step eager", train_step_fn(fm, batch, meanflow=False), rows, iters=5)
    fm_comp_fn = train_step_fn(fm, batch, meanflow=False, compiled=True)
    fm_comp = _measure("FM step compiled", fm_comp_fn, rows, iters=5)
    del fm, fm_comp_fn
    mf = build_model(preset, dtype=torch.float32, backend="triton")
    mf_ms = _measure("MeanFlow step triton", train_step_fn(mf, batch, meanflow=True), rows, iters=5)
    _step_ratios(rows, "MeanFlow step triton", "mf", mf_ms, fm_comp, fm_eager)
    if compiled_step:
        # The same step under torch.compile, as the FM baseline is: inductor fuses what lies between the
        # custom ops (adaLN, embedders, loss, the bf16 casts of the fp32 weights, gradient accumulation,
        # bias-gradient sums) and the Adam update. first_call_s includes inductor's compile time.
        torch._dynamo.reset()
        mfc_ms = _measure("MeanFlow step triton compiled", train_step_fn(mf, batch, meanflow=True, compiled=True),
                          rows, iters=5)
        _step_ratios(rows, "MeanFlow step triton compiled", "mf_compiled", mfc_ms, fm_comp, fm_eager)
    for k in ("triton_forward_over_eager_forward", "triton_forward_over_compiled_forward",
              "jvp_over_eager_forward", "jvp_over_compiled_forward", "mf_step_over_compiled_fm",
              "mf_mem_over_compiled_fm", "mf_step_over_eager_fm", "mf_compiled_step_over_compiled_fm",
              "mf_compiled_mem_over_compiled_fm", "mf_compiled_step_over_eager_fm"):
        if k in rows:
            print(f"  {k:<36} {rows[k]:.3f}×", flush=True)
    torch.cuda.empty_cache()
    return rows


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
                   help="preset:batch pairs (default: the must-show cases)")
    p.add_argument("--sampler", choices=["yes", "no", "only"], default="yes",
                   help="the 1-NFE sampler table: with the model tables, without it, or alone")
    p.add_argument("--no-compiled-step", dest="compiled_step", action="store_false",
                   help="skip the torch.compile'd MeanFlow step row (its first call compiles the whole step)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of this script only (fp32, TRITON_INTERPRET=1, tiny presets)")
    args = p.parse_args(argv)
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
    cases = [(c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])) for c in args.cases]
    for preset, batch in (cases if args.sampler != "only" else []):
        out[f"{preset} b{batch}"] = model_table(preset, batch, args.quick, dtype, args.compiled_step)
    if args.sampler == "no":
        pass
    elif args.device == "cuda":
        out["sampler"] = sampler_table(dtype)
    else:
        out["sampler"] = sampler_table(dtype, preset=cases[0][0], batches=(1, 4))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
