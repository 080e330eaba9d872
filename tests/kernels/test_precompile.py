"""kernels/precompile.py: record a step's kernel launches without running them, then compile them all
in parallel (the compile half needs CUDA: GPU test)."""
import torch

import meanflow_fast.kernels.attention as attn
from meanflow_fast.kernels.precompile import PrecompileStats, precompile, record_launches
from meanflow_fast import MeanFlowLoss, meanflow_dit
from tests.helpers import HAS_CUDA, randomize_, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _model_step(dtype=torch.float32, B=2):
    model = randomize_(meanflow_dit("tiny"), std=0.1).to(DEVICE)
    model.backend = "triton"
    c = model.config
    x = torch.randn(B, c.in_channels, c.input_size, c.input_size, device=DEVICE)
    y = torch.randint(0, c.num_classes, (B,), device=DEVICE)
    loss_fn = MeanFlowLoss(num_classes=c.num_classes, omega=0.7, kappa=0.2, validate=False)
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


def test_precompile_without_cuda_says_so():
    if HAS_CUDA:
        return  # covered by the GPU test below
    stats = precompile(lambda: None)
    assert isinstance(stats, PrecompileStats) and stats.variants == 0 and "no CUDA" in str(stats)


@requires_cuda
def test_precompile_fills_the_cache_the_step_uses():
    """On a GPU: precompile compiles variants, a second precompile finds them all in the cache (the keys
    the warm-up compiled under are the ones real launches look up), and the real step after it runs
    with finite, reproducible results (bf16 autocast)."""
    model, step = _model_step(torch.bfloat16)
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
