"""Compile every Triton kernel variant a training step will launch, in parallel, before the step runs.

A cold first step compiles each kernel specialisation, and every autotune candidate of each, one after
another on one CPU thread: dozens of compiles at 1-3 s each. ``precompile(step)`` runs ``step`` once with
the launches of this package's kernels *recorded instead of executed* (torch's own ops still run, on
whatever the unlaunched kernels left in their outputs), then compiles every (kernel, specialisation,
autotune candidate) it saw on a thread pool through Triton's ``AsyncCompileMode``. The compiled kernels
land in Triton's in-memory cache under the keys the real launches will look up, so the first real step
only benchmarks the autotune candidates (milliseconds each) and runs.

    from meanflow_fast.kernels.precompile import precompile
    stats = precompile(lambda: torch.autograd.grad(loss_fn(model, x, y)[0], params))
    print(stats)   # 'compiled 41 kernel variants (118 launches seen) on 16 threads in 9.8 s'

Which kernels: every launch of a Triton kernel whose function is defined in a module of this package
(``meanflow_fast.kernels.*``: the DiT's and the iMF model's alike), plain ``@triton.jit`` or under
``triton.autotune``, found by that module name when it launches; a new kernel file needs no registering.
Launches of other Triton kernels run as usual.

``step`` must take the same code path, shapes, dtypes and autocast as the real step; it should not
update anything (its values are garbage): use ``torch.autograd.grad`` rather than ``backward`` plus an
optimizer step, which also keeps DistributedDataParallel's gradient hooks out of it. Without CUDA (or in
Triton's interpreter) there is nothing to compile and ``precompile`` only reports so.
"""
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from .launch import interpreting

try:  # Triton ≥ 3.4: JIT compiles submitted to an executor (what torch inductor uses)
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:  # pragma: no cover - older Triton
    AsyncCompileMode = None

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = None

__all__ = ["precompile", "record_launches", "PrecompileStats"]


@dataclass
class PrecompileStats:
    launches: int = 0        # kernel launches of this package that ``step`` made (recorded, not run)
    variants: int = 0        # distinct (kernel, specialisation, autotune candidate) compiled
    threads: int = 0
    seconds: float = 0.0     # recording + compiling
    skipped: str = ""        # why nothing was compiled, if so

    def __str__(self) -> str:
        if self.skipped:
            return f"precompile skipped: {self.skipped}"
        return (f"compiled {self.variants} kernel variants ({self.launches} launches seen) on {self.threads} "
                f"threads in {self.seconds:.1f} s")


def _is_ours(kernel) -> bool:
    """A kernel of this package (``kernels.*``), whatever wraps it (autotuner, JIT, interpreter)."""
    f = kernel
    while hasattr(f, "fn"):
        f = f.fn
    return getattr(f, "__module__", "").startswith(__package__ + ".")


_Launch = Tuple[object, tuple, dict]  # (kernel object, positional args, keyword args incl. grid)


@contextlib.contextmanager
def record_launches(sink: List[_Launch]):
    """Within the block, every launch of a kernel of this package is appended to ``sink`` as
    (kernel, args, kwargs) and not executed; other Triton kernels run as usual."""
    classes = [c for c in (Autotuner, JITFunction, InterpretedFunction) if c is not None]
    originals = {c: c.run for c in classes}

    def patched(cls):
        orig = originals[cls]

        def run(self, *args, **kwargs):
            if _is_ours(self) and not kwargs.get("warmup", False):
                sink.append((self, args, {k: v for k, v in kwargs.items() if k != "warmup"}))
                return None
            return orig(self, *args, **kwargs)
        return run

    for c in classes:
        c.run = patched(c)
    try:
        yield sink
    finally:
        for c, orig in originals.items():
            c.run = orig


def _warm(kernel, args, kwargs) -> int:
    """Submit the compiles of one recorded launch: every pruned autotune candidate, or the one variant
    of a plain JIT kernel. Returns how many compile requests were made (duplicates are merged by
    AsyncCompileMode on the cache key)."""
    if isinstance(kernel, Autotuner):
        return len(kernel.warmup(*args, **kwargs))
    kernel.warmup(*args, **kwargs)
    return 1


def precompile(step: Callable[[], object], threads: Optional[int] = None,
               log: Optional[Callable[[str], None]] = None) -> PrecompileStats:
    """Record the launches of ``step()`` and compile them all on ``threads`` worker threads (default:
    the CPUs this process may use, at most 32). See the module docstring for what ``step`` must be."""
    stats = PrecompileStats()
    if interpreting() or not torch.cuda.is_available():
        stats.skipped = "no CUDA device (or Triton's interpreter): nothing to compile"
        return stats
    if AsyncCompileMode is None:
        stats.skipped = "this Triton has no AsyncCompileMode (parallel compilation needs Triton ≥ 3.4)"
        return stats
    t0 = time.perf_counter()
    sink: List[_Launch] = []
    stats.threads = threads or min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count() or 1)
    # An optimisation only: any failure is reported and leaves the kernels to compile at first launch,
    # as without it (a kernel that fails to compile fails there too, with its own error).
    try:
        with record_launches(sink):
            step()
        torch.cuda.synchronize()
        stats.launches = len(sink)
        if log:
            log(f"precompile: {len(sink)} kernel launches recorded; compiling on {stats.threads} threads ...")
        with ThreadPoolExecutor(stats.threads) as pool:
            with AsyncCompileMode(pool) as mode:
                for kernel, args, kwargs in sink:
                    _warm(kernel, args, kwargs)
                stats.variants = len(mode.future_kernels)
    except Exception as e:  # noqa: BLE001
        stats.skipped = f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    stats.seconds = time.perf_counter() - t0
    if log:
        log(str(stats))
    return stats
