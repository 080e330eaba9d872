"""kernels/precompile.py: record a step's kernel launches without running them, then compile them all
in parallel (the compile half needs CUDA: GPU test). Both training steps: the DiT's (MeanFlowLoss) and the
iMF model's (IMFLoss), on backend="triton"."""
import collections
import contextlib
import logging

import pytest
import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

import meanflow_fast.kernels.attention as attn
from meanflow_fast.kernels import qk_norm_rope, rmsnorm, swiglu
from meanflow_fast.kernels.precompile import PrecompileStats, precompile, record_launches
from meanflow_fast import MeanFlowLoss, meanflow_dit
from meanflow_fast.imf import IMFLoss, imf_dit
from tests.helpers import HAS_CUDA, randomize_, requires_cuda

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = None

DEVICE = "cuda" if HAS_CUDA else "cpu"
IMF_KERNEL_MODULES = (rmsnorm, qk_norm_rope, swiglu)  # the kernel files only the iMF model uses


def _model_step(dtype=torch.float32, B=2, kind="dit"):
    """(model, step): one training step's loss and parameter gradients on backend="triton", the DiT with
    MeanFlowLoss or (``kind="imf"``) the iMF model with IMFLoss; ``step(seed)`` draws from its own generator."""
    if kind == "imf":
        model = randomize_(imf_dit("tiny"), std=0.1).to(DEVICE)
        loss_fn = IMFLoss(num_classes=model.config.num_classes, validate=False)
    else:
        model = randomize_(meanflow_dit("tiny"), std=0.1).to(DEVICE)
        loss_fn = MeanFlowLoss(num_classes=model.config.num_classes, omega=0.7, kappa=0.2, validate=False)
    model.backend = "triton"
    c = model.config
    x = torch.randn(B, c.in_channels, c.input_size, c.input_size, device=DEVICE)
    y = torch.randint(0, c.num_classes, (B,), device=DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(seed=0):
        with torch.autocast("cuda", dtype=dtype, enabled=HAS_CUDA and dtype != torch.float32):
            loss, _ = loss_fn(model, x, y, generator=torch.Generator(DEVICE).manual_seed(seed))
        return loss, torch.autograd.grad(loss, params)
    return model, step


def _name(kernel):
    f = kernel
    while hasattr(f, "fn"):
        f = f.fn
    return f.__name__


def test_record_launches_records_instead_of_running():
    """A recorded launch does not run: the output buffer keeps its fill. The kernel, the arguments and
    the grid are kept; outside the block the same launch runs."""
    o, do = torch.randn(1, 2, 5, 32, device=DEVICE), torch.randn(1, 2, 5, 32, device=DEVICE)
    delta = torch.full((1, 2, 5), float("nan"), device=DEVICE)
    args = (o, do, delta, *o.stride()[:3], *do.stride()[:3], 2, 5)
    sink = []
    with record_launches(sink):
        attn._attn_bwd_preprocess_kernel[(1, 2)](*args, HEAD_DIM=32, BLOCK_D=32, ALIGN=8, BLOCK_M=32)
    assert torch.isnan(delta).all()
    assert len(sink) == 1 and sink[0][0] is attn._attn_bwd_preprocess_kernel and sink[0][2]["grid"] == (1, 2)
    attn._attn_bwd_preprocess_kernel[(1, 2)](*args, HEAD_DIM=32, BLOCK_D=32, ALIGN=8, BLOCK_M=32)
    torch.testing.assert_close(delta, (o * do).sum(-1))


def test_record_launches_sees_every_kernel_of_a_training_step():
    """The launches of one MeanFlow step on the fused path (guidance forward, forward_jvp, backward):
    every kernel family of the package appears, attention's through its autotuners."""
    _, step = _model_step()
    sink = []
    with record_launches(sink):
        step()
    names = {_name(k) for k, _, _ in sink}
    # (the gated residual's own kernels do not run: both forward_jvp and the plain guidance forward fuse
    # every gated residual with the next LayerNorm-modulate, so ``_gated_residual_ln_fwd_kernel`` runs
    # with and without tangents)
    expected = {"_attn_fwd_jvp_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                "_attn_bwd_preprocess_kernel", "_ln_modulate_fwd_kernel", "_ln_modulate_bwd_kernel",
                "_gated_residual_ln_fwd_kernel", "_gated_residual_ln_bwd_kernel",
                "_dual_linear_fwd_kernel", "_gelu_bwd_kernel"}
    assert expected <= names, expected - names
    assert "_gated_residual_fwd_kernel" not in names and "_gated_residual_bwd_kernel" not in names
    has_tangent = {kw["HAS_TANGENT"] for k, _, kw in sink if _name(k) == "_gated_residual_ln_fwd_kernel"}
    assert has_tangent == {True, False}, has_tangent
    assert all("grid" in kw for _, _, kw in sink)


_JIT_CLASSES = tuple(c for c in (JITFunction, InterpretedFunction) if c is not None)


@contextlib.contextmanager
def _every_launch(sink):
    """Within the block every Triton launch, of any module, runs as usual and is appended to ``sink`` as
    (kernel, args, kwargs); an autotuner's launch counts once (not again for the kernel it runs)."""
    classes = (Autotuner,) + _JIT_CLASSES
    originals = {c: c.run for c in classes}
    depth = [0]

    def spy(orig):
        def run(self, *args, **kwargs):
            if depth[0] == 0 and not kwargs.get("warmup", False):
                sink.append((self, args, kwargs))
            depth[0] += 1
            try:
                return orig(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return run

    for c in classes:
        c.run = spy(originals[c])
    try:
        yield sink
    finally:
        for c, orig in originals.items():
            c.run = orig


def _launch_key(kernel, args, kwargs):
    """A launch as the compiler sees it: the kernel's module and name, the positional arguments (a tensor by
    dtype, shape and strides, anything else by value) and the keyword arguments but the grid."""
    f = kernel
    while hasattr(f, "fn"):
        f = f.fn
    pos = tuple((a.dtype, tuple(a.shape), a.stride()) if torch.is_tensor(a) else a for a in args)
    named = tuple(sorted((k, v) for k, v in kwargs.items() if k not in ("grid", "warmup")))
    return f.__module__, f.__name__, pos, named


def _imf_kernels():
    """The kernels (``*_kernel``) defined in the iMF kernel files."""
    return {n for m in IMF_KERNEL_MODULES for n, v in vars(m).items()
            if n.endswith("_kernel") and isinstance(v, _JIT_CLASSES)}


def test_record_launches_sees_every_launch_of_an_imf_step():
    """One iMF step (IMFLoss: the guidance forward on the v-head, forward_jvp, backward) on backend="triton":
    the recorder sees exactly the launches the step makes when it runs (the same kernels with the same
    arguments, as many times), and among them every kernel of the iMF kernel files."""
    _, step = _model_step(kind="imf")
    ran, recorded = [], []
    with _every_launch(ran):
        step()
    with record_launches(recorded):
        step()
    ran_keys = collections.Counter(_launch_key(*launch) for launch in ran)
    recorded_keys = collections.Counter(_launch_key(*launch) for launch in recorded)
    assert recorded_keys == ran_keys, (ran_keys - recorded_keys, recorded_keys - ran_keys)
    names = {_name(k) for k, _, _ in recorded}
    # the iMF kernel files' kernels, listed by hand from the files (a new one must show up too)
    by_hand = {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_gated_residual_rmsnorm_fwd_kernel",
               "_gated_residual_rmsnorm_bwd_kernel", "_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel",
               "_swiglu_gate_kernel"}
    assert by_hand <= _imf_kernels()
    assert _imf_kernels() <= names, _imf_kernels() - names
    assert {"_attn_fwd_jvp_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
            "_attn_bwd_preprocess_kernel"} <= names
    # the primal-only launches (guidance, v-head) and the dual ones (forward_jvp) both
    for kernel in ("_gated_residual_rmsnorm_fwd_kernel", "_qk_norm_rope_fwd_kernel", "_swiglu_gate_kernel"):
        has_tangent = {kw["HAS_TANGENT"] for k, _, kw in recorded if _name(k) == kernel}
        assert has_tangent == {True, False}, (kernel, has_tangent)


def test_train_precompile_step_runs_the_imf_step(monkeypatch):
    """meanflow-train's ``_precompile_kernels`` with an IMFDiT and IMFLoss (as ``--method imf`` builds them):
    the step it hands to precompile calls the loss as the training step does, at the local batch (the
    guidance forward on 3·B rows, forward_jvp on B), launches every iMF kernel, and leaves the global RNG
    as it was."""
    import meanflow_fast.kernels.precompile as pc
    from meanflow_fast.imagenet.train import _precompile_kernels
    seen, logged = [], []

    def fake_precompile(step, log=None):
        with record_launches(seen):
            grads = step()
        assert all(g is not None for g in grads)
        log("recorded")
    monkeypatch.setattr(pc, "precompile", fake_precompile)
    model = randomize_(imf_dit("tiny"), std=0.1).to(DEVICE)
    model.backend = "triton"
    loss_fn = IMFLoss(num_classes=model.config.num_classes, validate=False)
    log = logging.getLogger("test_precompile")
    monkeypatch.setattr(log, "info", logged.append)
    state = torch.get_rng_state()
    _precompile_kernels(model, loss_fn, 3, None, torch.device(DEVICE), log)
    assert logged == ["recorded"] and torch.equal(torch.get_rng_state(), state)
    assert _imf_kernels() <= {_name(k) for k, _, _ in seen}
    rows = {args[0].shape[0] for k, args, _ in seen if _name(k) == "_qk_norm_rope_fwd_kernel"}
    assert rows == {9, 3}, rows


def test_precompile_without_cuda_says_so():
    if HAS_CUDA:
        return  # covered by the GPU test below
    stats = precompile(lambda: None)
    assert isinstance(stats, PrecompileStats) and stats.variants == 0 and "no CUDA" in str(stats)


@requires_cuda
@pytest.mark.parametrize("kind", ["dit", "imf"])
def test_precompile_fills_the_cache_the_step_uses(kind):
    """On a GPU: precompile compiles variants, a second precompile finds them all in the cache (the keys
    the warm-up compiled under are the ones real launches look up), and the real step after it runs
    with finite, reproducible results (bf16 autocast); the DiT's step and the iMF model's."""
    model, step = _model_step(torch.bfloat16, kind=kind)
    stats = precompile(step)
    assert stats.variants > 0 and stats.launches > 0, stats
    assert precompile(step).variants == 0
    loss, grads = step(seed=1)
    loss2, grads2 = step(seed=1)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_precompile_failure_is_reported_not_raised(monkeypatch):
    """precompile is an optimisation: a step that fails while recording (or a compile that fails) is
    reported in the stats, never raised into the training run."""
    import meanflow_fast.kernels.precompile as pc
    monkeypatch.setattr(pc, "interpreting", lambda: False)
    monkeypatch.setattr(pc.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pc, "AsyncCompileMode", object)

    def step():
        raise RuntimeError("boom in the step")
    stats = precompile(step)
    assert stats.variants == 0 and "failed (RuntimeError: boom in the step)" in str(stats)
