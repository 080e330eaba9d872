"""meanflow-train end to end on one GPU, on synthetic latent shards: does the ImageNet trainer run on CUDA
(bf16 autocast, the Triton backend, precompilation, fused Adam, the EMA sample grid, checkpoints, resume),
and how many images per second (at what peak memory, from the trainer's log line) does it train at each
per-rank batch?

    PYTHONPATH=. python -m benchmarks.tools.train_smoke [--preset B/2] [--batches 32,128] [--steps 30]

Why: the CPU tests run the whole pipeline (tests/test_imagenet_pipeline.py, tests/test_reliability.py)
but only on CPU, with gloo and the torch backend; nothing there runs the trainer's CUDA path. And the
per-rank batch of the paper's setting on 8 GPUs is 256 / 8 = 32, where a step has a quarter of the work of
the benchmarks' batch 128 but the same number of kernel launches and the same per-step sync (the
non-finite guard): images/s at 32 against 128 shows how much of the step the host's launch overhead costs
(equal images/s: none).

Each batch size runs ``python -m meanflow_fast.imagenet.train`` in its own process (one process: no DDP;
NCCL needs one GPU per rank), ``--steps`` steps with a log line every third of them, so the last log
interval is steady state and the first holds the start-up (precompilation, autotuning), a sample grid
and a checkpoint at the end; then ``--resume latest`` for 3 steps more. It checks the exit status, that
no step was skipped, that the losses are finite, that the grid and the checkpoints exist and that the
resumed run says so. Exit 1 when any check fails. ``--device cpu`` is a dry run (tiny preset, 8×8
latents, the torch backend: the trainer's CPU path).
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG_RE = re.compile(r"step (\d+)/(\d+) \| loss (\S+) \| raw loss (\S+) \| ([\d.]+) images/s .*\| skipped (\d+)"
                    r"(?:.*peak mem ([\d.]+) GiB)?")


def write_shards(folder: str, images: int, latent: int, num_classes: int, per_shard: int = 1024) -> None:
    """Synthetic latent shards in meanflow-extract's format (``write_shard``): N(0, 1) latents, their
    flips, uniform labels."""
    import torch
    from meanflow_fast.imagenet.data import shard_name, write_shard
    g = torch.Generator().manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    for k, start in enumerate(range(0, images, per_shard)):
        n = min(per_shard, images - start)
        z = torch.randn(n, 4, latent, latent, generator=g)
        y = torch.randint(0, num_classes, (n,), generator=g)
        write_shard(os.path.join(folder, shard_name(k)), z, z.flip(3), y,
                    {"image_size": 8 * latent, "latent_scale": 0.18215, "latent_mode": "mean",
                     "vae": "synthetic (benchmarks/tools/train_smoke.py)", "num_classes": num_classes,
                     "expected": n, "skipped": 0})


def run_train(argv: List[str], log_path: str, timeout: float) -> Dict:
    """One meanflow-train process; its output goes to ``log_path``. Returns the exit status, wall time
    and the parsed log lines."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    t0 = time.perf_counter()
    with open(log_path, "a") as f:
        f.write(f"$ python -m meanflow_fast.imagenet.train {' '.join(argv)}\n")
        f.flush()
        try:
            rc = subprocess.run([sys.executable, "-m", "meanflow_fast.imagenet.train", *argv], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    text = open(log_path).read().split(f"$ python -m meanflow_fast.imagenet.train {' '.join(argv)}\n")[-1]
    lines = [dict(step=int(m[1]), loss=float(m[3]), raw=float(m[4]), ips=float(m[5]), skipped=int(m[6]),
                  mem_gib=float(m[7]) if m[7] else None) for m in LOG_RE.finditer(text)]
    return dict(rc=rc, wall_s=wall, lines=lines, text=text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="default: B/2 (CUDA), tiny (--device cpu)")
    p.add_argument("--batches", default=None, help="per-rank batch sizes, comma-separated (default 32,128; cpu: 4)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 30; cpu: 3), multiple of 3")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per trainer process")
    p.add_argument("--workdir", default=None, help="where shards and runs go (default: a temporary folder, "
                                                   "removed at the end; B/2 checkpoints are 2.1 GB each)")
    p.add_argument("--log-dir", default=None, help="where the trainer logs go (default: --workdir if given, "
                                                  "else the current folder)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    preset = args.preset or ("tiny" if cpu else "B/2")
    steps = args.steps or (3 if cpu else 30)
    if steps < 3 or steps % 3:
        p.error(f"--steps must be a positive multiple of 3, got {steps}")
    try:
        batches = [int(b) for b in (args.batches or ("4" if cpu else "32,128")).split(",")]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in batches):
        p.error(f"--batches must be ≥ 1, got {batches}")
    if not cpu:
        import torch
        if not torch.cuda.is_available():
            print("benchmarks/tools/train_smoke.py needs a CUDA GPU; none found (--device cpu for a dry run)",
                  file=sys.stderr)
            return 2
    latent, num_classes = (8, 10) if cpu else (32, 1000)
    work = args.workdir or tempfile.mkdtemp(prefix="train-smoke-")
    log_dir = args.log_dir or (work if args.workdir else os.getcwd())
    data = os.path.join(work, "latents")
    os.makedirs(log_dir, exist_ok=True)
    # enough images (each read twice per epoch: itself and its flip) that no run wraps an epoch
    images = math.ceil(max(batches) * (steps + 3) / 2) + max(batches)
    t0 = time.perf_counter()
    write_shards(data, images, latent, num_classes)
    print(f"train_smoke: {images} synthetic {latent}×{latent} latents in {time.perf_counter() - t0:.1f} s "
          f"({work}); preset {preset}, {steps} steps per batch size, device {args.device}")

    failures, results = [], []
    for b in batches:
        run_dir = os.path.join(work, f"run_b{b}")
        log_path = os.path.join(log_dir, f"train_smoke_b{b}.log")
        common = ["--data-path", data, "--results-dir", run_dir, "--preset", preset, "--global-batch-size", str(b),
                  "--num-workers", "2", "--log-every", str(steps // 3), "--ckpt-every", str(steps),
                  "--sample-every", str(steps), "--sample-count", "4"] + (["--device", "cpu"] if cpu else [])
        first = run_train(common + ["--max-steps", str(steps)], log_path, args.timeout)
        resumed = run_train(common + ["--max-steps", str(steps + 3), "--resume", "latest"], log_path, args.timeout)
        problems = []
        for name, r, n_lines in (("run", first, 3), ("resumed run", resumed, 1)):
            if r["rc"] != 0:
                problems.append(f"{name} exited {r['rc']}")
            elif len(r["lines"]) < n_lines:
                problems.append(f"{name}: {len(r['lines'])} step log lines, expected {n_lines}")
            if any(ln["skipped"] or not (math.isfinite(ln["loss"]) and math.isfinite(ln["raw"])) for ln in r["lines"]):
                problems.append(f"{name}: a skipped step or a non-finite loss")
        if first["rc"] == 0:
            if not os.path.exists(os.path.join(run_dir, "samples", f"{steps:07d}.png")):
                problems.append("no sample grid")
            if not os.path.exists(os.path.join(run_dir, "checkpoints", f"{steps:07d}.json")):
                problems.append("no checkpoint")
        if resumed["rc"] == 0 and "resumed from" not in resumed["text"]:
            problems.append("the resumed run did not say it resumed")
        lines = first["lines"]
        steady = lines[-1]["ips"] if len(lines) >= 2 else float("nan")
        row = dict(batch=b, wall_s=round(first["wall_s"], 1),
                   first_interval_s=round(steps // 3 * b / lines[0]["ips"], 1) if lines and lines[0]["ips"] else None,
                   steady_images_per_s=steady, steady_ms_per_step=round(1e3 * b / steady, 2) if steady > 0 else None,
                   raw_losses=[ln["raw"] for ln in lines], peak_mem_gib=lines[-1]["mem_gib"] if lines else None,
                   problems=problems, log=log_path)
        results.append(row)
        failures += [f"batch {b}: {m}" for m in problems]
        print(f"  batch {b:4d}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}; process {row['wall_s']} s, "
              f"first {steps // 3} steps {row['first_interval_s']} s (start-up included), steady "
              f"{steady:.1f} images/s = {row['steady_ms_per_step']} ms/step; "
              f"{'peak mem %s GiB' % row['peak_mem_gib'] if row['peak_mem_gib'] is not None else 'no peak mem (CPU)'}; "
              f"raw losses {row['raw_losses']}")
        if problems:
            print("    last lines of its log:\n      " + "\n      ".join(
                (resumed if resumed["rc"] else first)["text"].strip().splitlines()[-8:]))
    ok = [r for r in results if r["steady_images_per_s"] == r["steady_images_per_s"]]
    if len(ok) >= 2:
        lo, hi = min(ok, key=lambda r: r["batch"]), max(ok, key=lambda r: r["batch"])
        print(f"  images/s at batch {lo['batch']} / at batch {hi['batch']}: "
              f"{lo['steady_images_per_s'] / hi['steady_images_per_s']:.2f} (1.0: the small batch is as "
              f"efficient; well under: launch overhead or small-GEMM inefficiency)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(preset=preset, steps=steps, device=args.device, results=results), f, indent=1)
    if failures:
        print("train_smoke: FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
