"""Samplers: the update rule by hand, an analytic flow, seeding and bad input."""
import pytest
import torch

from meanflow_fast import meanflow_dit, sample
from meanflow_fast.model import time_dtype
from meanflow_fast.sampling import sample_times
from tests.helpers import randomize_, rel_err


def _model():
    return randomize_(meanflow_dit("tiny", input_size=4, in_channels=2, depth=1, hidden_size=32,
                                   num_heads=2, num_classes=3, freq_dim=16), std=0.2).double()


def test_one_step_is_noise_minus_u():
    model = _model()
    y = torch.tensor([0, 2, 3])  # 3 = null label
    eps = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x = sample(model, y, steps=1, noise=eps)
    assert rel_err(x, eps - model(eps, torch.zeros(3, dtype=torch.float64),
                                  torch.ones(3, dtype=torch.float64), y)) <= 1e-14


@pytest.mark.parametrize("steps", [2, 5])
def test_n_steps_follow_the_update_rule(steps):
    model = _model()
    y = torch.tensor([1, 0])
    eps = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    z = eps.clone()
    grid = [1 - i / steps for i in range(steps + 1)]
    for t, r in zip(grid, grid[1:]):
        z = z - (t - r) * model(z, r, t, y)
    assert rel_err(sample(model, y, steps=steps, noise=eps), z) <= 1e-14


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_exact_average_velocity_recovers_the_data_point(steps):
    """Point-mass data x*: the true u(z, r, t) = (z − x*)/t, so every sampler lands on x* exactly."""
    x_star = torch.randn(1, 3, 5, 5, dtype=torch.float64)

    def u(z, r, t, y):
        return (z - x_star) / t.view(-1, 1, 1, 1)  # t: (B,)

    y = torch.zeros(4, dtype=torch.long)
    x = sample(u, y, steps=steps, shape=(3, 5, 5), dtype=torch.float64,
               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, x_star.expand(4, -1, -1, -1), atol=1e-12)


def test_user_callable_may_index_the_times():
    """r and t reach the model as (B,) tensors, as in MeanFlowLoss: r[:, None] works in both."""
    x_star = torch.randn(1, 3, 5, 5)

    def u(z, r, t, y):
        return (z - x_star) / t[:, None, None, None] + 0 * r[:, None, None, None]

    x = sample(u, torch.zeros(4, dtype=torch.long), steps=3, shape=(3, 5, 5),
               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x_star.expand(4, -1, -1, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("times", [None, (1.0, 0.6, 0.13, 0.0)])
def test_times_are_batch_tensors_and_samples_are_unchanged(dtype, times):
    """Times are (B,) tensors in the model's time dtype on z's device, and the project's model gives
    exactly z_r = z_t − (t − r)·u(z_t, r, t) with those tensors (the float times it was given before
    round to the same values)."""
    model = _model().to(dtype)
    y = torch.tensor([1, 0, 3])
    seen = []

    def spy(z, r, t, y_):
        seen.append((r, t))
        return model(z, r, t, y_)

    grid = list(times) if times is not None else [1.0, 0.5, 0.0]
    x = sample(spy, y, times=times, steps=2, noise=(eps := torch.randn(3, 2, 4, 4, dtype=dtype)))
    assert len(seen) == len(grid) - 1
    z = eps
    for (r_seen, t_seen), t, r in zip(seen, grid, grid[1:]):
        for got, want in ((r_seen, r), (t_seen, t)):
            assert torch.is_tensor(got) and got.shape == (3,) and got.dtype == time_dtype(z.dtype)
            assert torch.equal(got, torch.full((3,), want, dtype=time_dtype(z.dtype)))
        z = z - (t - r) * model(z, torch.full((3,), r, dtype=time_dtype(z.dtype)),
                                torch.full((3,), t, dtype=time_dtype(z.dtype)), y)
    assert torch.equal(x, z)


def test_seeded_sampling_is_reproducible():
    model = _model()
    y = torch.tensor([0, 1, 2])
    a = sample(model, y, generator=torch.Generator().manual_seed(1))
    b = sample(model, y, generator=torch.Generator().manual_seed(1))
    c = sample(model, y, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, 2, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)


def test_sampler_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="steps must be an int"):
        sample(model, torch.tensor([0]), steps=0)
    with pytest.raises(ValueError, match="times must decrease"):
        sample(model, torch.tensor([0]), times=[1.0, 0.5, 0.7, 0.0])
    with pytest.raises(ValueError, match="y must be a non-empty 1-D integer tensor"):
        sample(model, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="y must be a non-empty 1-D integer tensor"):
        sample(model, torch.tensor([True]))
    # labels outside the embedding table (3 classes + the null label 3): a clear error, not an IndexError
    # here or a device-side assert on CUDA
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\] .* got min -1, max 2"):
        sample(model, torch.tensor([2, -1, 0]))
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\] .* got min 0, max 4"):
        sample(model, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"noise must be \(B=2, \.\.\.\)"):
        sample(model, torch.tensor([0, 1]), noise=torch.randn(3, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape is required"):
        sample(lambda z, r, t, y: z, torch.tensor([0]))
    assert sample_times(4) == (1.0, 0.75, 0.5, 0.25, 0.0)
