"""Fréchet distance against closed forms, the training step's NaN guard, EMA and atomic writes."""
import math
import os

import numpy as np
import pytest
import torch

from meanflow_fast import MeanFlowLoss, meanflow_dit
from meanflow_fast.io import atomic_write, save_safetensors
from meanflow_fast.metrics import feature_stats, frechet_distance
from meanflow_fast.training import EMA, train_step


# ------------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_closed_form_diagonal():
    """Diagonal covariances: FD = ‖μ1 − μ2‖² + Σ_i (σ1_i − σ2_i)²."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    s1, s2 = rng.uniform(0.2, 2.0, 7), rng.uniform(0.2, 2.0, 7)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rotated_and_scaled():
    """Σ2 = k²·Σ1 (commuting, any rotation): tr(Σ1 Σ2)^{1/2} = k·tr Σ1, so FD = ‖Δμ‖² + (1 − k)² tr Σ1."""
    rng = np.random.default_rng(1)
    A = rng.normal(size=(5, 5))
    s1 = A @ A.T + 0.1 * np.eye(5)
    k = 1.7
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((mu1 - mu2) ** 2).sum() + (1 - k) ** 2 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, k * k * s1) == pytest.approx(expected, rel=1e-9)
    same = frechet_distance(mu1, s1, mu1, s1)
    assert 0.0 <= same < 1e-9  # never the −1e−12 of cancellation


def test_frechet_distance_general_against_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(400, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    (m1, s1), (m2, s2) = feature_stats(f1), feature_stats(f2)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_bad_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"features must be \(n, d\)"):
        feature_stats(np.zeros(5))


# ------------------------------------------------------------------------------- training step
def _setup():
    model = meanflow_dit("tiny", input_size=4, in_channels=2, depth=1, hidden_size=32, num_heads=2,
                         num_classes=3, freq_dim=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 0])
    return model, opt, x, y


def test_train_step_updates_weights_and_ema():
    model, opt, x, y = _setup()
    ema = EMA(model, decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_step(model, MeanFlowLoss(), opt, x, y, ema=ema, generator=torch.Generator().manual_seed(0))
    assert stats["skipped"] == 0.0 and math.isfinite(stats["raw_loss"])
    after = list(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    # EMA: e = 0.5·before + 0.5·after, per parameter.
    for e, a, b in zip(ema.model.parameters(), after, before):
        torch.testing.assert_close(e, 0.5 * a.detach() + 0.5 * b, rtol=1e-6, atol=1e-7)


def test_non_finite_loss_skips_the_step():
    model, opt, x, y = _setup()
    ema = EMA(model, decay=0.9)
    # One step first so that Adam has state (a NaN must not reach it either).
    train_step(model, MeanFlowLoss(), opt, x, y, ema=ema)
    weights = [p.detach().clone() for p in model.parameters()]
    ema_w = [p.detach().clone() for p in ema.model.parameters()]
    x_bad = x.clone()
    x_bad[1, 0, 2, 3] = float("nan")
    stats = train_step(model, MeanFlowLoss(), opt, x_bad, y, ema=ema)
    assert stats["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), ema_w))
    assert all(torch.isfinite(s).all() for st in opt.state.values() for s in st.values() if torch.is_tensor(s))


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        EMA(torch.nn.Linear(2, 2), decay=1.0)


# ------------------------------------------------------------------------------- atomic writes
def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_safetensors({"w": torch.ones(3)}, str(path))
    old = path.read_bytes()

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), broken)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp file left behind
    assert os.path.getsize(path) == len(old)
