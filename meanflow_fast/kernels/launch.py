"""Launcher helpers shared by the dual-stream (primal + tangent) Triton kernels.

A public call is validated once, by its public function, with the checkers below: an unsupported call
ends in a ``ValueError`` that names the argument and lists what is allowed, never in a Triton compile
error or a silently wrong answer. The Functions, custom ops and inner launches trust what they are given;
a launcher called directly (``*_fwd(..., check=True)``, the default) validates as a public function does.
"""
import contextlib
import functools
import math
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16 or bfloat16"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a ``@triton.jit`` function is *defined*: it must be set before
    ``kernels`` is imported (``tests/conftest.py`` does so on machines without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


# The two private torch helpers fall back to picking the op, should a torch version lack them.
_EAGER_TYPES = (torch.Tensor, torch.nn.Parameter)
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)


def _in_dispatch_mode() -> bool:
    return _dispatch_stack_len() > 0 if _dispatch_stack_len is not None else True


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _needs_op(args) -> bool:
    """Must this kernel call go through its torch.library op rather than the launcher? Under a compile, a
    dispatch mode (FakeTensorMode, tracers, loggers), a torch.func transform (its wrapped tensors have no
    storage to launch on), a first argument that is not a plain tensor, a backward under torch.func
    (``backward_once``), or a call autograd would record (grad mode on, an input requiring grad): a direct
    launch is invisible to autograd, while the op's backward raises NotImplementedError (``kernel_op``) or
    is the real one an op file registered."""
    return (torch.compiler.is_compiling() or _in_dispatch_mode() or _functorch_active()
            or type(args[0]) not in _EAGER_TYPES or _forced_op_calls > 0
            or (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)))


def kernel_op(name: str) -> Callable:
    """Decorator: register a kernel launcher as the torch.library custom op ``name`` (one opaque node with
    its fake shapes for torch.compile) and return a callable that runs the launcher *directly* in plain
    eager mode and the op wherever something traces, transforms or watches the call (``_needs_op``).
    The op would add nothing to a plain eager call but host time: ~55 µs a call for the dispatcher and the
    custom-op autograd wrapper, at 172 calls per guided DiT-B/2 step (benchmarks/tools/host_overhead.py).
    The callable forwards ``register_fake`` and ``register_autograd`` to the op. Every op starts with a
    backward that raises NotImplementedError (``_not_differentiable``): autograd reaches an op only when
    something differentiates the kernels' backward (create_graph=True) or the op is called directly. An op
    file may register the op's real backward after this one (attention's forward ops do)."""
    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_autograd(functools.partial(_not_differentiable, name))

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if _needs_op(args) else fn(*args)
        call.register_fake = op.register_fake
        call.register_autograd = op.register_autograd
        return call
    return wrap


# Why a second derivative through the kernels raises, and what to use instead (kernel_op, backward_once).
NOT_DIFFERENTIABLE = ("the Triton kernels' backward is not differentiable{}; use the pure-torch backend "
                      "(backend='torch' / the *_ref functions) for higher derivatives")


def _not_differentiable(name: str, ctx, *grads):
    raise NotImplementedError(f"{name}: " + NOT_DIFFERENTIABLE.format(
        " (a backward through its custom op: a create_graph=True gradient differentiated again)"))


try:  # what torch's apply does to the arguments outside a transform (a finished level's wrappers)
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead
except ImportError:  # another torch version: nothing to unwrap
    def _unwrap_dead(args):
        return args


class KernelFunction(torch.autograd.Function):
    """Base of the autograd.Functions over the kernels, all in the torch.func form (``forward`` without
    ctx, ``setup_context``) that torch.func transforms require. For that form torch's ``apply`` re-binds
    the arguments to forward's signature through ``inspect.signature`` on every call, a third of the host
    time of a DiT-B/2 ``forward_jvp`` (benchmarks/tools/host_overhead.py). Outside a transform this
    ``apply`` skips the binding, so every argument of ``forward`` must be passed, positionally (the
    kernels' forwards have no defaults); under a transform it is torch's own. Dynamo traces ``apply``
    itself and never calls this one."""

    @classmethod
    def apply(cls, *args):
        if _functorch_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead(args))


def backward_once(backward: Callable) -> Callable:
    """Decorator for the ``backward`` of every autograd.Function over the kernels: under one torch.func
    transform the backward runs unrecorded and through the ops; under a second live one it raises
    NotImplementedError instead of a silent zero (docs/DESIGN.md, Backward: why)."""
    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        if torch.compiler.is_compiling() or not _applied_under_func(ctx):
            return backward(ctx, *grads)
        _check_single_level(ctx)
        with torch.no_grad(), _through_ops():
            return backward(ctx, *grads)
    return wrapped


_forced_op_calls = 0  # > 0 while a backward must call the kernels through their ops (_through_ops)


@contextlib.contextmanager
def _through_ops():
    """Every kernel_op call inside goes through its torch.library op (``_needs_op``)."""
    global _forced_op_calls
    _forced_op_calls += 1
    try:
        yield
    finally:
        _forced_op_calls -= 1


_SingleLevelFunction = getattr(torch.autograd.function, "_SingleLevelFunction", None)
_functorch_c = getattr(torch._C, "_functorch", None)


def _applied_under_func(ctx) -> bool:
    """Was the Function of this backward applied under a torch.func transform? Then autograd holds the
    class functorch generated for it, a direct subclass of ``_SingleLevelFunction``; a plain apply holds
    our Function, which is one too, through ``torch.autograd.Function``. Without the private class
    (another torch version): whenever a transform is active."""
    if _SingleLevelFunction is None:
        return _functorch_active()
    cls = getattr(ctx, "_forward_cls", torch.autograd.Function)
    return issubclass(cls, _SingleLevelFunction) and not issubclass(cls, torch.autograd.Function)


def _check_single_level(ctx) -> None:
    """Refuse unless no torch.func transform is live or the only live one is the Function's own (the
    level of its saved tensors). Refuses whenever the private helpers are missing."""
    try:
        live = _functorch_c.get_dynamic_layer_stack_depth()
        if live == 0:
            return
        saved = ctx.saved_tensors
        own = _functorch_c.maybe_get_level(saved[0]) if saved else _functorch_c.maybe_current_level()
        if live == 1 and own == _functorch_c.maybe_current_level():
            return
    except AttributeError:
        pass
    raise NotImplementedError(NOT_DIFFERENTIABLE.format(
        ": torch.func.grad / vjp over them works under one transform, not under a second one (a grad of a "
        "grad, a jvp of a grad, hessian, a vjp_fn called inside a grad)"))


def check_tensors(op: str, tensors: Dict[str, Optional[torch.Tensor]]) -> torch.dtype:
    """All given tensors (None entries are skipped) must be floating tensors of one supported dtype on
    one device: CUDA, or the CPU under the interpreter. Returns the common dtype."""
    dtype = device = first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not torch.is_tensor(t):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; supported dtypes are {_DTYPE_NAMES}")
        if dtype is None:
            dtype, device, first = t.dtype, t.device, name
            continue
        if t.dtype != dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but {first} has {dtype}; all inputs "
                             f"(primals, tangents and parameters) must share one dtype")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {device}; all inputs "
                             f"must be on one device")
    if device is not None:
        if device.type == "cpu":
            if not interpreting():
                raise ValueError(
                    f"{op}: the inputs are CPU tensors but Triton's interpreter is off; set "
                    f"TRITON_INTERPRET=1 before importing kernels, move the inputs to a CUDA device, or "
                    f"use the pure-torch reference ({op}_ref / backend='torch')")
        elif device.type not in ("cuda", "meta"):
            raise ValueError(f"{op}: inputs are on {device}; supported devices are CUDA and the CPU "
                             f"(with TRITON_INTERPRET=1)")
    return dtype


def check_no_bf16_dot_on_cpu(op: str, dtype: torch.dtype, device: torch.device) -> None:
    """The interpreter's bf16 tl.dot returns garbage (triton issue #11584): refuse bf16 GEMMs on the CPU."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        raise ValueError(f"{op}: bfloat16 is not supported in Triton's CPU interpreter (its bf16 tl.dot "
                         f"returns garbage, triton issue #11584); use float32/float16 on the CPU or bf16 on CUDA")


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{hint}, got {tuple(t.shape)}")


def rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """View (..., width) as (M, width) rows. ``reshape`` returns a view whenever the leading dims can be
    merged (any strides otherwise, the kernels take both strides) and copies only when they cannot."""
    return t.reshape(math.prod(t.shape[:-1]), width)  # not -1: that is ambiguous for width 0


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def elementwise_tiles(width: int, cuda: bool) -> Tuple[int, int]:
    """(rows, columns) of the tile of an elementwise, memory-bound kernel over (M, width) rows (the gated
    residual's kernels, the MLP backward's GELU pass). Any tile that keeps the loads coalesced and ≥ 2
    programs per SM will do: at most 256 columns × 8 rows = 2048 elements, 8 values per thread and tensor
    at 8 warps. The interpreter prefers few, large programs (up to 1024 columns, 2+ rows)."""
    cols = min(next_pow2(width), 256 if cuda else 1024)
    return max(1, 2048 // cols), cols


def elementwise_row_launch(M: int, N: int, cuda: bool) -> Tuple[int, int, int]:
    """(rows per step, rows per program, features per program) of an elementwise pass over (M, N) rows that
    loops over row steps (the MLP backward's GELU pass, SwiGLU's gate pass): steps of ``elementwise_tiles``
    (8 × 256 on CUDA, as the gated residual's kernels), as many per program as ``steps_per_program`` gives
    on CUDA; the interpreter prefers few, large programs (64 rows)."""
    block_r, block_n = elementwise_tiles(N, cuda)
    steps = steps_per_program(triton.cdiv(M, block_r) * triton.cdiv(N, block_n)) if cuda else triton.cdiv(64, block_r)
    return block_r, block_r * steps, block_n


def steps_per_program(tiles: int, target_programs: int = 16384, max_steps: int = 8) -> int:
    """Tiles each program of a row-reducing backward kernel walks through (its loop over a batch
    element's tokens), a power of 2: one while the launch has at most ``target_programs`` programs, then
    just enough to stay near that count. Backwards over 1-3 k programs moved their bytes at 0.45-0.65 TB/s,
    forwards over 12-16 k programs at 1.9-3 TB/s (H100, docs/TUNING.md). More programs cost larger fp32
    partial sums (one row of D per program): a launcher may ask for more steps than this."""
    return min(max_steps, next_pow2(triton.cdiv(max(int(tiles), 1), target_programs)))


def check_tangents_together(op: str, tangents: Dict[str, Optional[torch.Tensor]]) -> bool:
    """A fused op takes either all its tangents (the dual launch) or none (the primal-only launch).
    Returns whether they are given; raises a ValueError naming the missing ones when only some are."""
    missing = [name for name, t in tangents.items() if t is None]
    if missing and len(missing) < len(tangents):
        *head, last = tangents
        raise ValueError(f"{op}: {', '.join(head)} and {last} must be given together (use zeros for a constant "
                         f"input), got None for {missing}")
    return not missing


def zeros_if_none(tangent: Optional[torch.Tensor], primal: torch.Tensor) -> torch.Tensor:
    """A forward-mode tangent autograd left as None (a constant input) as explicit zeros, for a kernel
    that takes every tangent."""
    return torch.zeros_like(primal) if tangent is None else tangent


def pick_function(forward_ad_fn, compile_fn):
    """The autograd.Function to apply: the one with a ``jvp`` (forward-mode AD through the fused dual
    kernel: torch.func.jvp and torch.autograd.forward_ad over a model calling the op), except while
    torch.compile traces, which cannot trace a Function that defines ``jvp``: there ``compile_fn``, its
    ``without_jvp`` twin (``jvp_function``). Dynamo reads neither class's attributes, so both are passed."""
    return compile_fn if torch.compiler.is_compiling() else forward_ad_fn


def jvp_function(jvp_inputs: int) -> Callable[[type], type]:
    """Class decorator for a KernelFunction that defines a forward-mode ``jvp``. Its ``setup_context`` is
    written for reverse mode alone; the decorated class's also saves ``inputs[:jvp_inputs]`` for ``jvp``
    (``ctx.save_for_forward``). ``cls.without_jvp`` is the compile-safe twin: the same forward,
    setup_context and backward, no jvp and nothing saved for it (Dynamo can trace neither)."""
    def decorate(fn_cls: type) -> type:
        reverse_setup = fn_cls.setup_context
        methods = {name: vars(fn_cls)[name] for name in ("forward", "setup_context", "backward")}
        twin_name = fn_cls.__name__ + "WithoutJvp"
        fn_cls.without_jvp = type(fn_cls)(twin_name, fn_cls.__bases__, {
            **methods, "__module__": fn_cls.__module__, "__qualname__": twin_name,
            "__doc__": f"{fn_cls.__name__} without its jvp, for torch.compile (launch.jvp_function)."})

        def setup_context_saving_for_jvp(ctx, inputs, output):
            reverse_setup(ctx, inputs, output)
            ctx.save_for_forward(*inputs[:jvp_inputs])
        fn_cls.setup_context = staticmethod(setup_context_saving_for_jvp)
        return fn_cls
    return decorate
