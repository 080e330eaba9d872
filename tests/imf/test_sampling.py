"""iMF sampling: ``sample`` and ``GraphSampler`` on an IMFDiT against a loop written here from the official
update rule, the official per-size guidance settings, the u-head only, and bad input.

    x ← x − (t − r)·u(x, t, h = t − r, ω, t_min, t_max | y),  t_steps = linspace(1, 0, steps + 1)
"""
import math
from dataclasses import replace

import pytest
import torch

from meanflow_fast import meanflow_dit, sample
from meanflow_fast.graph_sampler import GraphSampler
from meanflow_fast.imf import IMF_PRESETS, IMFConfig, IMFDiT, imf_dit, load_official_imf, official_state_dict
from tests.helpers import randomize_, rel_err, requires_cuda

# The released checkpoints' evaluation settings (ω, t_min, t_max), as the official README and
# configs/eval_config.yml give them; the small presets sample unguided (ω = 1 over [0, 1]).
OFFICIAL = {("B/2", 1): (8.0, 0.4, 0.65), ("M/2", 1): (10.5, 0.4, 0.6), ("L/2", 1): (10.5, 0.4, 0.6),
            ("XL/2", 1): (8.0, 0.42, 0.62), ("XL/2", 2): (4.0, 0.36, 0.64)}
SMALL = (1.0, 0.0, 1.0)


def _model(dtype=torch.float64, device="cpu", **overrides):
    """A small iMF DiT with every parameter random (zero gates would make the blocks the identity)."""
    m = imf_dit("tiny", input_size=4, in_channels=3, num_classes=5, **overrides)
    return randomize_(m, std=0.15).to(device, dtype).eval()


def _loop(u, eps, y, steps, omega, t_min, t_max):
    """The official sampler, written out in fp64: one u call per step on t_steps = linspace(1, 0, n + 1)."""
    z = eps.clone()
    t_steps = [1.0 - i / steps for i in range(steps + 1)]
    for t, r in zip(t_steps, t_steps[1:]):
        B = z.shape[0]
        full = lambda s: torch.full((B,), s, dtype=torch.float64) if not torch.is_tensor(s) else s  # noqa: E731
        z = z - (t - r) * u(z, full(t), full(t - r), full(omega), full(t_min), full(t_max), y)
    return z


def _u_of(model):
    """u from the model's two-head forward: the reference does not take the sampler's heads='u' path."""
    return lambda *a: model(*a, heads="both")[0]


# ------------------------------------------------------------------------------------------ sample
@pytest.mark.parametrize("steps", [1, 2, 3, 6])
def test_steps_follow_the_update_rule(steps):
    model = _model()
    y = torch.tensor([0, 4, 5, 2, 1])  # 5 = the null label
    eps = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    omega, t_min, t_max = 1 + 6 * torch.rand(()).item(), 0.1 + 0.3 * torch.rand(()).item(), 0.7
    got = sample(model, y, steps=steps, noise=eps, omega=omega, t_min=t_min, t_max=t_max)
    ref = _loop(_u_of(model), eps, y, steps, omega, t_min, t_max)
    assert rel_err(got, ref) <= 1e-13
    # the update moved the noise: a sampler that returned eps would fail above only by chance
    assert rel_err(got, eps) > 1e-3


def test_per_sample_settings_as_tensors():
    model = _model()
    B, steps = 4, 3
    y = torch.randint(0, 6, (B,))
    eps = torch.randn(B, 3, 4, 4, dtype=torch.float64)
    omega = 1 + 9 * torch.rand(B, dtype=torch.float64)
    t_min = 0.5 * torch.rand(B, dtype=torch.float64)
    t_max = 0.5 + 0.5 * torch.rand(B, dtype=torch.float64)
    got = sample(model, y, steps=steps, noise=eps, omega=omega, t_min=t_min, t_max=t_max)
    ref = _loop(_u_of(model), eps, y, steps, omega, t_min, t_max)
    assert rel_err(got, ref) <= 1e-13
    # each row took its own setting: row 0's setting on every row gives a different batch
    one = sample(model, y, steps=steps, noise=eps, omega=float(omega[0]), t_min=float(t_min[0]),
                 t_max=float(t_max[0]))
    assert rel_err(one[1:], got[1:]) > 1e-6


@pytest.mark.parametrize("preset", ["tiny", "digits"])
@pytest.mark.parametrize("steps", [1, 2])
def test_small_presets_default_to_no_guidance(preset, steps):
    c = IMF_PRESETS[preset]
    model = randomize_(imf_dit(preset), std=0.15).double().eval()
    y = torch.randint(0, c["num_classes"] + 1, (3,))
    eps = torch.randn(3, c["in_channels"], c["input_size"], c["input_size"], dtype=torch.float64)
    got = sample(model, y, steps=steps, noise=eps)
    assert rel_err(got, _loop(_u_of(model), eps, y, steps, *SMALL)) <= 1e-13
    # ω matters to this random network, so the default was not some other setting by accident
    assert rel_err(got, _loop(_u_of(model), eps, y, steps, 3.0, 0.0, 1.0)) > 1e-6


def _closed_form_u(z, t, h, omega, t_min, t_max, y):
    c = lambda s: s.view(-1, 1, 1, 1)  # noqa: E731
    return z * (1 + 0.1 * c(omega)) + c(t_min) - 2 * c(t_max) + 0.3 * c(h) + 0.7 * c(t) + 0.01 * c(y.double())


class _Analytic(IMFDiT):
    """An IMFDiT of a real preset's architecture, built on the meta device (no weights), whose u is a
    closed-form function of every input: it shows which ω, interval and times reach the network."""

    def forward(self, z, t, h, omega, t_min, t_max, y, heads="both"):
        self.calls.append(heads)
        u = _closed_form_u(z, t, h, omega, t_min, t_max, y)
        return u if heads == "u" else (u, -u)


def _analytic(config):
    with torch.device("meta"):
        m = _Analytic(config)
    m.calls = []
    return m


@pytest.mark.parametrize("size", ["B/2", "M/2", "L/2", "XL/2"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_paper_sizes_default_to_the_official_settings(size, steps):
    """Any number of steps without its own official entry uses the nearest smaller one."""
    model = _analytic(_config(size))
    expected = OFFICIAL.get((size, min(steps, 2)), OFFICIAL[(size, 1)])
    y = torch.randint(0, 1001, (2,))
    eps = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    got = sample(model, y, steps=steps, noise=eps)
    assert rel_err(got, _loop(_closed_form_u, eps, y, steps, *expected)) <= 1e-14
    assert model.calls == ["u"] * steps


def _config(size, **overrides):
    return replace(IMFConfig(), **IMF_PRESETS[size], **overrides)


@pytest.mark.parametrize("size", ["B/2", "XL/2"])
def test_official_checkpoints_find_their_settings(size):
    """A released checkpoint (the inference layout, without the v-head's blocks) loaded through
    load_official_imf gets its size's settings: its shapes alone name the architecture."""
    with torch.device("meta"):
        released = IMFDiT(_config(size, v_head=False))
    loaded = load_official_imf(official_state_dict(released), device="meta")
    model = _analytic(loaded.config)
    y, eps = torch.tensor([3, 1000]), torch.randn(2, 4, 32, 32, dtype=torch.float64)
    for steps in (1, 2):
        expected = OFFICIAL.get((size, steps), OFFICIAL[(size, 1)])
        got = sample(model, y, steps=steps, noise=eps)
        assert rel_err(got, _loop(_closed_form_u, eps, y, steps, *expected)) <= 1e-14


def test_only_the_u_head_runs():
    model = _model()
    ran = {"v": 0, "u": 0, "calls": 0}
    for block in model.v_blocks:
        block.register_forward_hook(lambda *_: ran.__setitem__("v", ran["v"] + 1))
    model.v_final.register_forward_hook(lambda *_: ran.__setitem__("v", ran["v"] + 1))
    model.u_final.register_forward_hook(lambda *_: ran.__setitem__("u", ran["u"] + 1))
    model.register_forward_hook(lambda *_: ran.__setitem__("calls", ran["calls"] + 1))
    sample(model, torch.tensor([1, 2]), steps=3, generator=torch.Generator().manual_seed(0), omega=2.0,
           t_min=0.2, t_max=0.8)
    assert ran == {"v": 0, "u": 3, "calls": 3}
    GraphSampler(model, steps=2, omega=2.0, t_min=0.2, t_max=0.8)(torch.tensor([1, 2]))
    assert ran == {"v": 0, "u": 5, "calls": 5}


def test_model_without_v_head_samples():
    model = _model(v_head=False)
    with_v = _model()
    with_v.load_state_dict(model.state_dict(), strict=False)
    y, eps = torch.tensor([0, 3]), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert rel_err(sample(model, y, steps=2, noise=eps), sample(with_v, y, steps=2, noise=eps)) <= 1e-15


def test_seeded_noise_is_the_models_shape_and_dtype():
    model = _model(dtype=torch.float32)
    y = torch.tensor([0, 1, 2])
    a = sample(model, y, generator=torch.Generator().manual_seed(5))
    eps = torch.randn((3, 3, 4, 4), generator=torch.Generator().manual_seed(5))
    assert a.dtype == torch.float32 and a.shape == (3, 3, 4, 4)
    torch.testing.assert_close(a, sample(model, y, noise=eps))


# ------------------------------------------------------------------------------------- bad input
def test_settings_are_rejected_for_a_meanflow_model():
    model = meanflow_dit("tiny", input_size=4, in_channels=2, depth=1, hidden_size=32, num_heads=2,
                         num_classes=3, freq_dim=16)
    y = torch.tensor([0, 1])
    for kw in ({"omega": 2.0}, {"t_min": 0.1}, {"t_max": 0.9}):
        with pytest.raises(ValueError, match="omega, t_min and t_max are sampling inputs of an iMF model"):
            sample(model, y, **kw)
        with pytest.raises(ValueError, match="omega, t_min and t_max are sampling inputs of an iMF model"):
            GraphSampler(model, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(omega=0.5), "omega .* must be finite and ≥ 1"),
    (dict(omega=math.nan), "omega .* must be finite and ≥ 1"),
    (dict(omega=math.inf), "omega .* must be finite and ≥ 1"),
    (dict(omega="8"), "omega must be a float"),
    (dict(t_min=0.7, t_max=0.6), "0 ≤ t_min ≤ t_max ≤ 1"),
    (dict(t_min=-0.1), "0 ≤ t_min ≤ t_max ≤ 1"),
    (dict(t_max=1.5), "0 ≤ t_min ≤ t_max ≤ 1"),
    (dict(omega=torch.tensor([2.0, 0.9])), "omega .* must be finite and ≥ 1 .* every sample"),
    (dict(t_min=torch.tensor([0.1, 0.9]), t_max=0.8), "0 ≤ t_min ≤ t_max ≤ 1 for every sample"),
    (dict(omega=torch.tensor([2.0, 2.0, 2.0])), r"omega must be a float or a tensor of shape \(B=2,\)"),
    (dict(omega=torch.tensor([2, 3])), "omega must be a float or a .* floating-point tensor"),
    (dict(t_max=torch.ones(2, 1)), "t_max must be a float or a .* floating-point tensor"),
])
def test_bad_settings(kw, match):
    model = _model(dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        sample(model, torch.tensor([0, 1]), **kw)


def test_bad_labels_and_steps():
    model = _model(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 5\]"):
        sample(model, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="steps must be an int ≥ 1"):
        sample(model, torch.tensor([0]), steps=0)


def test_unknown_architecture_needs_explicit_settings():
    model = _model(dtype=torch.float32, depth=2)  # no preset has this size
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="t_min, t_max: this iMF architecture .* has no default sampling setting"):
        sample(model, y, omega=2.0)
    with pytest.raises(ValueError, match="has no default sampling setting"):
        GraphSampler(model)
    x = sample(model, y, omega=2.0, t_min=0.0, t_max=1.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 4, 4) and torch.isfinite(x).all()


# -------------------------------------------------------------------------------- GraphSampler
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_graph_sampler_cpu_path_equals_the_loop(steps):
    model = _model()
    y = torch.tensor([0, 4, 5, 2])
    noise = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    got = GraphSampler(model, steps=steps, omega=3.5, t_min=0.25, t_max=0.75)(y, noise)
    assert rel_err(got, _loop(_u_of(model), noise, y, steps, 3.5, 0.25, 0.75)) <= 1e-13
    # defaults: the preset's (unguided for tiny)
    got = GraphSampler(model, steps=steps)(y, noise)
    assert rel_err(got, _loop(_u_of(model), noise, y, steps, *SMALL)) <= 1e-13


def test_graph_sampler_defaults_follow_the_official_table():
    model = _analytic(_config("XL/2"))
    y, eps = torch.tensor([7, 9]), torch.randn(2, 4, 32, 32, dtype=torch.float64)
    for steps in (1, 2):
        got = GraphSampler(model, steps=steps)(y, eps)
        assert rel_err(got, _loop(_closed_form_u, eps, y, steps, *OFFICIAL[("XL/2", steps)])) <= 1e-14


def test_graph_sampler_bad_arguments():
    model = _model(dtype=torch.float32)
    with pytest.raises(ValueError, match="omega must be a float \\(or a 0-d tensor\\) here"):
        GraphSampler(model, omega=torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="omega .* must be finite and ≥ 1"):
        GraphSampler(model, omega=0.0)
    with pytest.raises(ValueError, match="0 ≤ t_min ≤ t_max ≤ 1"):
        GraphSampler(model, t_min=0.9, t_max=0.1)
    with pytest.raises(ValueError, match="warmup must be ≥ 1"):
        GraphSampler(model, warmup=0)
    with pytest.raises(ValueError, match="noise must be"):
        GraphSampler(model)(torch.tensor([0, 1]), torch.randn(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 5\]"):
        GraphSampler(model)(torch.tensor([0, 6]), torch.randn(2, 3, 4, 4))


@requires_cuda
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("batch", [1, 8])
def test_graph_replay_equals_eager(steps, batch):
    model = _model(dtype=torch.float32, device="cuda")
    sampler = GraphSampler(model, steps=steps, omega=4.0, t_min=0.3, t_max=0.7)
    for trial in range(3):  # the first call captures; later calls replay with new inputs
        y = torch.randint(0, 6, (batch,), device="cuda")
        noise = torch.randn(batch, 3, 4, 4, device="cuda")
        got = sampler(y, noise)
        ref = sample(model, y, steps=steps, noise=noise, omega=4.0, t_min=0.3, t_max=0.7)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(sampler._graphs) == 1
