"""The process runner of the config sweeps (attention_sweep.py, gemm_sweep.py beside it): every config in
its own process, so that a config that faults (an illegal memory access kills the CUDA context, and with
it the process) is reported for that config and the sweep goes on. Standard library only: the parent never
imports torch or the kernels before it has set the environment its workers inherit.

A sweep module's ``main`` adds these options with ``add_runner_args`` and, when it is a worker
(``--worker JSON``), hands over to ``run_as_worker``, which prints ``json.dumps(worker(job))`` as the last
line of its output; ``worker`` returns a dict with ``status`` ("ok", "FAULT", "ERROR", ...) and, when
``job["time"]`` is set, ``ms`` (``time_ms``): ``run_job`` does both.
"""
import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List


def run_worker(module: str, job: Dict, timeout: float) -> Dict:
    """``python -m module --worker JSON`` in a fresh process; its last JSON line, or why there is none."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(job)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"status": "TIMEOUT"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:  # the process died (e.g. a fault at exit, an abort in the compiler)
        return {"status": "CRASH", "error": f"exit {r.returncode}: {r.stderr.strip()[-200:]}"}
    return json.loads(lines[-1])


def check_then_time(module: str, jobs: List[Dict], n_parallel: int, timeout: float, timed: bool) -> List[Dict]:
    """Each job checked in ``n_parallel`` processes at once (compile, run, compare), then, when ``timed``,
    each one that passed timed again alone, one process after another (no overlapping timings).
    Returns the jobs, each merged with its result."""
    with cf.ThreadPoolExecutor(n_parallel) as ex:
        checked = list(ex.map(lambda j: run_worker(module, dict(j, time=False), timeout), jobs))
    results = []
    for job, res in zip(jobs, checked):
        if res.get("status") == "ok" and timed:
            res = run_worker(module, dict(job, time=True), timeout)
        results.append(dict(job, **res))
    return results


def run_job(job: Dict, out: Dict, prepare: Callable[[], Callable], check: Callable[[Any], Dict]) -> Dict:
    """A worker's job: ``prepare()`` builds the call under test, ``check`` turns the result of its first
    run into status fields, and the call is timed when the job asks for it on CUDA. An exception anywhere
    is the config's failure (FAULT or ERROR). Returns ``out`` with the results."""
    try:
        fn = prepare()
        out.update(check(fn()))
        if job["time"] and job["device"] == "cuda":
            out["ms"] = time_ms(fn)
    except Exception as e:  # noqa: BLE001 - reported per config, the sweep goes on
        out.update(failure(e))
    return out


def failure(e: Exception) -> Dict:
    """The result of a config whose run raised ``e``: FAULT for a CUDA fault, else ERROR."""
    fault = "illegal memory access" in str(e) or type(e).__name__ == "AcceleratorError"
    return {"status": "FAULT" if fault else "ERROR", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"}


def add_runner_args(p: argparse.ArgumentParser) -> None:
    """The options every sweep shares: parallel checks, per-process timeout, device, JSON output, and the
    hidden ``--worker`` that runs one job."""
    p.add_argument("--jobs", type=int, default=8, help="parallel processes for the checks")
    p.add_argument("--timeout", type=float, default=300, help="seconds per process")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def run_as_worker(args, worker) -> bool:
    """In a worker process (``--worker JSON``): run the job, print its result, return True."""
    if args.worker is None:
        return False
    print(json.dumps(worker(json.loads(args.worker))), flush=True)
    return True


def time_ms(fn) -> float:
    """Median ms of ``fn`` on the GPU (triton.testing.do_bench)."""
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def finish(results: List[Dict], out: str) -> int:
    """Write ``results`` as JSON to ``out`` (if given); the exit status: 1 when any job was not ok."""
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any(r["status"] != "ok" for r in results) else 0
