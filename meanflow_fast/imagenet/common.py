"""Shared plumbing of the ImageNet commands: usage errors, torch.distributed setup, rank-0 logging,
device and backend choice."""
import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, NoReturn, Optional

import torch
import torch.distributed as dist

__all__ = ["UsageError", "DistEnv", "init_distributed", "cleanup_distributed", "barrier", "get_logger",
           "resolve_backend", "run_cli", "run_command", "end_process", "positive_int", "nonneg_int",
           "positive_float"]


class UsageError(ValueError):
    """Bad input from the user (a flag value, a missing or malformed file): the CLI prints the message
    as ``<prog>: error: ...`` and exits with status 2, without a traceback."""


# ----------------------------------------------------------------------------------- argparse types
def _typed(kind, check, allowed: str):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {s!r}")
        if not check(v):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {s!r}")
        return v
    parse.__name__ = allowed
    return parse


positive_int = _typed(int, lambda v: v >= 1, "an integer ≥ 1")
nonneg_int = _typed(int, lambda v: v >= 0, "an integer ≥ 0")
positive_float = _typed(float, lambda v: v > 0 and v == v and v != float("inf"), "a finite number > 0")


def run_cli(parser: argparse.ArgumentParser, check: Callable, main: Callable, argv: Optional[List[str]] = None):
    """Parse, validate (``check(args)`` raises UsageError) and run ``main(args)``; a UsageError from
    either becomes ``parser.error`` (exit status 2, a one-line message)."""
    args = parser.parse_args(argv)
    try:
        check(args)
        return main(args)
    except UsageError as e:
        cleanup_distributed()
        parser.error(str(e))


def run_command(cli: Callable[[], object]) -> None:
    """Run a command's ``cli()`` as a process: what its console script (``meanflow-train`` ...) and
    ``python -m meanflow_fast.imagenet.<command>`` call.

    ``cli`` returns a value for Python callers (the FID, the last checkpoint's path); the process exits
    with status 0 after success instead (the console script's ``sys.exit(value)`` would print the value
    and exit with status 1). A finished torchrun worker on gloo leaves through ``end_process``."""
    cli()
    if _gloo_job:
        end_process(0)


def end_process(status: int = 0) -> NoReturn:
    """Flush the logs and stdio, then exit at once with ``status``, without the interpreter's teardown.

    For a finished gloo (CPU) torchrun worker: torch 2.13's gloo can free a collective issued inside a
    backward on its worker thread while the interpreter tears down, which aborts the process (SIGABRT,
    "terminate called without an active exception") after a successful run. Whatever a command writes
    is closed and renamed into place before it returns, so nothing is lost by skipping teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# ----------------------------------------------------------------------------------- distributed
_gloo_job = False  # this process joined a torchrun job on gloo (see end_process)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistEnv:
    """Join the torchrun job if there is one (nccl on CUDA, gloo on CPU); else a single process.

    ``device``: "cuda", "cpu" or None (CUDA when available)."""
    global _gloo_job
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise UsageError(f"--device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        _gloo_job = device != "cuda"
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                device_id=dev if device == "cuda" else None)
    return DistEnv(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def get_logger(name: str, is_main: bool, logfile: Optional[str] = None) -> logging.Logger:
    """Rank 0 logs to stdout (and ``logfile``); other ranks log warnings and errors only."""
    logger = logging.getLogger(f"meanflow_fast.imagenet.{name}")
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    logger.addHandler(h)
    if is_main and logfile:
        fh = logging.FileHandler(logfile)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    return logger


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: the fused Triton kernels on CUDA when they import, else the torch reference."""
    if backend not in ("auto", "torch", "triton"):
        raise UsageError(f"--backend must be one of auto, torch, triton, got {backend!r}")
    if backend == "torch":
        return "torch"
    if device.type != "cuda":
        if backend == "triton":
            raise UsageError("--backend triton needs a CUDA device; use --backend torch (or auto) on CPU")
        return "torch"
    try:
        from meanflow_fast.ops import get_dual_ops
        get_dual_ops("triton")
        return "triton"
    except (ImportError, ValueError) as e:
        if backend == "triton":
            raise UsageError(f"--backend triton is not available: {e}")
        return "torch"
