"""The CUDA-graph sampler: eager equivalence on CPU, graph replay equals eager on a GPU."""
import pytest
import torch

from meanflow_fast import meanflow_dit, sample
from meanflow_fast.graph_sampler import GraphSampler
from tests.helpers import randomize_, rel_err, requires_cuda


def _model(device="cpu", dtype=torch.float32):
    m = meanflow_dit("tiny", input_size=8, in_channels=4, depth=2, hidden_size=64, num_heads=2,
                     num_classes=5, freq_dim=32)
    return randomize_(m, std=0.1).to(device, dtype).eval()


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_cpu_path_equals_reference_sampler(steps):
    model = _model(dtype=torch.float64)
    y = torch.tensor([0, 4, 5, 2])
    noise = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    got = GraphSampler(model, steps=steps)(y, noise)
    assert rel_err(got, sample(model, y, steps=steps, noise=noise)) <= 1e-14


def test_decode_is_applied():
    model = _model(dtype=torch.float64)
    y = torch.tensor([1, 2])
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    decode = lambda x: 2 * x[:, :3] + 1  # noqa: E731
    got = GraphSampler(model, decode=decode)(y, noise)
    assert rel_err(got, decode(sample(model, y, noise=noise))) <= 1e-14


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="warmup must be ≥ 1"):
        GraphSampler(model, warmup=0)
    with pytest.raises(ValueError, match="times must decrease"):
        GraphSampler(model, times=[0.0, 1.0])
    with pytest.raises(ValueError, match="noise must be"):
        GraphSampler(model)(torch.tensor([0, 1]), torch.randn(3, 4, 8, 8))
    null = model.config.num_classes
    with pytest.raises(ValueError, match=rf"y must hold labels in \[0, {null}\]"):
        GraphSampler(model)(torch.tensor([0, null + 1]), torch.randn(2, 4, 8, 8))


@requires_cuda
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("batch", [1, 8])
def test_graph_replay_equals_eager(steps, batch):
    model = _model("cuda")
    sampler = GraphSampler(model, steps=steps)
    for trial in range(3):  # first call captures; later calls replay with new inputs
        y = torch.randint(0, 6, (batch,), device="cuda")
        noise = torch.randn(batch, 4, 8, 8, device="cuda")
        got = sampler(y, noise)
        ref = sample(model, y, steps=steps, noise=noise)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(sampler._graphs) == 1
