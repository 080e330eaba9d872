"""The kernels' implementation switches, read from one place.

Each switch names the implementation it picks. The defaults hold until a GPU benchmark decides between
the two (``benchmarks/bench_dual_ops.py`` times both sides; docs/TUNING.md has what is known so far);
then the loser's code path and its switch go. An environment variable overrides a default when the
module is imported, and ``override`` changes a switch for a block of code (tests, A/B benchmarks)::

    MEANFLOW_FAST_RESIDUAL_LN=apart python train.py
    with config.override(plain_dual_linear="triton"): ...
"""
import contextlib
import os
from typing import Dict, Iterator, Tuple

# name -> (allowed values, default first). Every switch only matters on CUDA except residual_ln.
CHOICES: Dict[str, Tuple[str, ...]] = {
    # Gated residual + the next LayerNorm-modulate: one fused kernel, or the two ops' kernels apart.
    "residual_ln": ("fused", "apart"),
    # A dual linear without the GELU epilogue (qkv, proj, fc2, final) on CUDA: two cuBLAS GEMMs, or the
    # dual-stream Triton GEMM. Off CUDA it always runs the Triton kernel.
    "plain_dual_linear": ("cublas", "triton"),
    # The MLP's fc1 + GELU when no backward follows, on CUDA: one cuBLASLt GEMM with its GELU epilogue,
    # or the Triton GEMM with the GELU epilogue.
    "no_grad_fc1": ("cublaslt", "triton"),
}


def env_name(name: str) -> str:
    return f"MEANFLOW_FAST_{name.upper()}"


def _checked(name: str, value: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"meanflow_fast.kernels.config: unknown switch {name!r}; the switches are "
                         f"{', '.join(CHOICES)}")
    if value not in CHOICES[name]:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, CHOICES[name]))}, got {value!r}")
    return value


def _from_env() -> Dict[str, str]:
    values = {}
    for name, allowed in CHOICES.items():
        raw = os.environ.get(env_name(name))
        values[name] = allowed[0] if raw is None else _checked(name, raw.strip().lower(), env_name(name))
    return values


_values = _from_env()


def get(name: str) -> str:
    """The implementation the switch ``name`` picks now."""
    if name not in CHOICES:
        _checked(name, "", "")
    return _values[name]


@contextlib.contextmanager
def override(**switches: str) -> Iterator[None]:
    """Set switches for the duration of a ``with`` block, e.g. ``override(residual_ln="apart")``."""
    new = {name: _checked(name, value, f"config.override({name}=...)") for name, value in switches.items()}
    old = dict(_values)
    _values.update(new)
    try:
        yield
    finally:
        _values.clear()
        _values.update(old)
