"""MeanFlowDiT's input checks (``MeanFlowDiT._check_inputs``): every bad call of ``model(...)`` and
``model.forward_jvp(...)`` is a ValueError naming the argument, on both backends; valid edge values
still run (against torch.func.jvp); the value checks are off under torch.compile and are not repeated
inside MeanFlowLoss, ``sample`` and GraphSampler, which check their own draws."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import meanflow_fast.model as model_mod
from meanflow_fast import MeanFlowLoss, meanflow_dit, sample
from meanflow_fast.graph_sampler import GraphSampler
from tests.helpers import randomize_, rel_err

CALLS = ["forward", "forward_jvp"]
BACKENDS = ["torch", "triton"]  # triton: the tiny preset's head dim 32; bad calls raise before any kernel


def _tiny(backend="torch", dtype=torch.float32):
    m = randomize_(meanflow_dit("tiny"), std=0.1).to(dtype)
    m.backend = backend
    return m


def _args(model, B=3, dtype=None):
    c = model.config
    dtype = dtype or model.x_embedder.weight.dtype
    z = torch.randn(B, c.in_channels, c.input_size, c.input_size, dtype=dtype)
    t = torch.rand(B, dtype=dtype) * 0.9 + 0.05
    return dict(z=z, r=t * torch.rand(B, dtype=dtype), t=t, y=torch.randint(0, c.num_classes + 1, (B,)))


def _call(model, kind, z, r, t, y, dz=None, **kw):
    if kind == "forward":
        return model(z, r, t, y, **kw)
    return model.forward_jvp(z, r, t, y, torch.randn(z.shape).to(z.dtype) if dz is None else dz, **kw)


# ------------------------------------------------------------------------------- bad calls
# (id, change to the valid arguments of the tiny model: B = 3, 4×8×8 latents, 10 classes, message)
BAD = [
    ("t>1 float", lambda a: dict(t=1.3), r"t must lie in \[0, 1\] \(0 ≤ r ≤ t ≤ 1\), got t.min\(\) = 1.3"),
    ("t>1 tensor", lambda a: dict(t=torch.tensor([0.5, 1.25, 0.9]), r=torch.zeros(3)),
     r"t must lie in \[0, 1\] .*t.max\(\) = 1.25"),
    ("t nan", lambda a: dict(t=torch.tensor([0.5, float("nan"), 0.9]), r=torch.zeros(3)),
     r"t must lie in \[0, 1\] .*got NaN"),
    ("r<0", lambda a: dict(r=torch.tensor([0.1, -0.2, 0.0])),
     r"r must lie in \[0, 1\] .*r.min\(\) = -0.2, r.max\(\) = 0.1 \(first at sample 1; outside at 1 of 3 samples\)"),
    ("r>t", lambda a: dict(r=torch.tensor([0.2, 0.7, 0.4]), t=torch.tensor([0.3, 0.6, 0.4])),
     r"r must be ≤ t for every sample .* got r = 0.7 > t = 0.6 at sample 1 \(r > t at 1 of 3 samples\)"),
    ("r>t floats", lambda a: dict(r=0.8, t=0.5), r"r must be ≤ t .* r = 0.8 > t = 0.5 at sample 0"),
    ("label num_classes+1", lambda a: dict(y=torch.tensor([0, 11, 10])),
     r"y must hold labels in \[0, 10\] \(10 = the null label, unconditional\), got min 0, max 11"),
    ("label -1", lambda a: dict(y=torch.tensor([3, -1, 2])), r"y must hold labels in \[0, 10\] .*got min -1, max 3"),
    ("z float64", lambda a: dict(z=a["z"].double()),
     r"z has dtype torch.float64 but the model's parameters are torch.float32: pass z.to\(torch.float32\) "
     r"or convert the model with model.to\(torch.float64\)"),
    ("z float16", lambda a: dict(z=a["z"].half()), r"z has dtype torch.float16 but the model's parameters are"),
    ("z int", lambda a: dict(z=a["z"].long()), "z must be a floating-point tensor"),
    ("wrong C", lambda a: dict(z=torch.randn(3, 3, 8, 8)), r"z must have shape \(B, 4, 8, 8\), got \(3, 3, 8, 8\)"),
    ("wrong H", lambda a: dict(z=torch.randn(3, 4, 6, 8)), r"z must have shape \(B, 4, 8, 8\)"),
    ("wrong W", lambda a: dict(z=torch.randn(3, 4, 8, 10)), r"z must have shape \(B, 4, 8, 8\)"),
    ("y shape", lambda a: dict(y=torch.zeros(3, 1, dtype=torch.long)), r"y must be an integer tensor of shape \(3,\)"),
    ("y length", lambda a: dict(y=torch.zeros(2, dtype=torch.long)), r"y must be an integer tensor of shape \(3,\)"),
    ("y device", lambda a: dict(y=a["y"].to("meta")), "y is on meta but z is on cpu"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", CALLS)
@pytest.mark.parametrize("change,match", [pytest.param(c, m, id=i) for i, c, m in BAD])
def test_bad_call_is_a_value_error(kind, backend, change, match):
    model = _tiny(backend)
    args = _args(model)
    args.update(change(args))
    with pytest.raises(ValueError, match=match):
        _call(model, kind, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_jvp_checks_its_tangents(backend):
    model = _tiny(backend)
    a = _args(model)
    with pytest.raises(ValueError, match=r"dz must have z's dtype and device \(torch.float32 on cpu\), got "
                                         r"torch.float64 on cpu"):
        model.forward_jvp(**a, dz=torch.randn_like(a["z"]).double())
    with pytest.raises(ValueError, match=r"dz must be a tensor shaped like z \(3, 4, 8, 8\)"):
        model.forward_jvp(**a, dz=torch.randn(3, 4, 8, 7))
    with pytest.raises(ValueError, match=r"dr must be a float, a 0-d tensor or shape \(3,\)"):
        model.forward_jvp(**a, dz=torch.randn_like(a["z"]), dr=torch.zeros(2))


# ------------------------------------------------------------------------------- valid edge values
def _func_jvp(model, z, r, t, y, dz):
    """(u, du/dt) by torch.func.jvp over the plain forward (fp64): the reference."""
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t),
                              (dz, torch.zeros_like(r), torch.ones_like(t)))


@pytest.mark.parametrize("edge", ["t=1,r=0", "r=t", "r=t=0", "r=t=1", "null label", "mixed"])
def test_valid_edge_values_run(edge):
    """The ends of 0 ≤ r ≤ t ≤ 1 and the null label pass the checks: fp64 model and fp64 z (odd shapes),
    forward_jvp against torch.func.jvp over the forward."""
    model = randomize_(meanflow_dit("tiny", input_size=6, in_channels=3, depth=2, hidden_size=48, num_heads=3,
                                    num_classes=7, freq_dim=32), std=0.15).double()
    B = 3
    z, dz = torch.randn(B, 3, 6, 6, dtype=torch.float64), torch.randn(B, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 7, (B,))
    f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    r, t = {"t=1,r=0": (f64(0, 0, 0), f64(1, 1, 1)), "r=t": (f64(0.3, 0.71, 0.9), f64(0.3, 0.71, 0.9)),
            "r=t=0": (f64(0, 0, 0), f64(0, 0, 0)), "r=t=1": (f64(1, 1, 1), f64(1, 1, 1)),
            "null label": (f64(0.2, 0.4, 0.1), f64(0.5, 0.4, 0.3)),
            "mixed": (f64(0, 0.5, 1), f64(1, 0.5, 1))}[edge]
    if edge == "null label":
        y = torch.tensor([7, 0, 7])
    u, dudt = model.forward_jvp(z, r, t, y, dz)
    u_ref, dudt_ref = _func_jvp(model, z, r, t, y, dz)
    assert rel_err(u, u_ref) <= 1e-10 and rel_err(dudt, dudt_ref) <= 1e-10
    # floats for the times are the same call
    if edge in ("t=1,r=0", "r=t=1", "r=t=0"):
        assert rel_err(model(z, float(r[0]), float(t[0]), y), u_ref) <= 1e-10


def test_valid_edge_values_run_on_the_triton_backend():
    """t = 1, r = 0 and the null label through the fused kernels (interpreter), against the torch backend."""
    model = _tiny("triton")
    z, dz = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    y = torch.tensor([10, 3])
    u, dudt = model.forward_jvp(z, 0.0, 1.0, y, dz)
    u_ref, dudt_ref = model.forward_jvp(z, 0.0, 1.0, y, dz, backend="torch")
    assert rel_err(u, u_ref) <= 1e-5 and rel_err(dudt, dudt_ref) <= 1e-5
    assert rel_err(model(z, 0.0, 1.0, y), u_ref) <= 1e-5


def test_autocast_keeps_fp32_z_and_takes_the_autocast_dtype():
    """torch.autocast does not change z's dtype: fp32 z into an fp32 model stays valid under it, and z in
    the autocast dtype is accepted there too (autocast casts it with the weights), not outside it."""
    model = _tiny()
    a = _args(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u32 = model(**a)
        ub = model(**{**a, "z": a["z"].bfloat16()})
        _, db = model.forward_jvp(**{**a, "z": a["z"].bfloat16()}, dz=torch.randn_like(a["z"]).bfloat16())
    assert u32.shape == ub.shape == db.shape == a["z"].shape
    assert rel_err(ub, model(**a)) <= 0.05  # bf16 against fp32
    with pytest.raises(ValueError, match="z has dtype torch.bfloat16 but the model's parameters are torch.float32"):
        model(**{**a, "z": a["z"].bfloat16()})


# ------------------------------------------------------------------------------- when the value checks run
def test_value_checks_are_off_under_torch_compile(monkeypatch):
    """Out-of-range times and labels raise in eager mode and pass while torch.compile traces (where a
    check would be a host sync and a graph break); the structural checks stay."""
    model = _tiny()
    a = _args(model)
    bad = dict(a, t=torch.tensor([0.5, 1.5, 0.2]), y=torch.tensor([0, 1, 12]))
    for kind in CALLS:
        with pytest.raises(ValueError, match="must"):
            _call(model, kind, **bad)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for kind in CALLS:
        _call(model, kind, **dict(bad, y=a["y"]))  # the embedding would fail on label 12 itself
    with pytest.raises(ValueError, match="z has dtype torch.float64"):
        model(**dict(bad, z=a["z"].double()))


def test_value_checks_are_off_during_cuda_graph_capture(monkeypatch):
    """No host read is allowed while a CUDA graph is being captured (stubbed here: CPU only); the
    structural checks stay."""
    model = _tiny()
    a = _args(model)
    bad = dict(a, t=torch.tensor([0.5, 1.5, 0.2]))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        model(**bad)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for kind in CALLS:
        _call(model, kind, **bad)
    with pytest.raises(ValueError, match="z has dtype torch.float64"):
        model(**dict(bad, z=a["z"].double()))


def test_compiled_forward_is_one_graph_with_bad_times():
    """fullgraph=True: the checks add no graph break, and an out-of-range t is not read under compile."""
    torch._dynamo.reset()
    model = _tiny()
    a = _args(model)
    t = torch.tensor([0.5, 1.5, 0.2])
    u = torch.compile(model, backend="eager", fullgraph=True)(a["z"], a["r"], t, a["y"])
    with model_mod.skip_value_checks():
        assert torch.equal(u, model(a["z"], a["r"], t, a["y"]))


def test_loss_is_one_graph_without_validation():
    """MeanFlowLoss(validate=False) with guidance traces into one graph: ``skip_value_checks`` is a
    no-op under compile."""
    torch._dynamo.reset()
    model = _tiny()
    loss_fn = MeanFlowLoss(validate=False, omega=0.6, kappa=0.2)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    loss = torch.compile(lambda x_, y_: loss_fn(model, x_, y_)[0], backend="eager", fullgraph=True)(x, y)
    assert torch.isfinite(loss)


@pytest.fixture
def value_check_calls(monkeypatch):
    """How many times the model ran its value checks (``meanflow_fast.model.check_values``)."""
    calls = []
    orig = model_mod.check_values

    def counted(*args, **kw):
        calls.append(args)
        return orig(*args, **kw)
    monkeypatch.setattr(model_mod, "check_values", counted)
    return calls


def test_loss_and_samplers_do_not_repeat_the_value_checks(value_check_calls):
    model = _tiny()
    a = _args(model)
    model(**a)
    model.forward_jvp(**a, dz=torch.randn_like(a["z"]))
    assert len(value_check_calls) == 2  # the counter sees direct calls
    value_check_calls.clear()
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 9, 0])
    for loss_fn in (MeanFlowLoss(), MeanFlowLoss(omega=0.6, kappa=0.2), MeanFlowLoss(ratio_r_neq_t=0.0),
                    MeanFlowLoss(jvp="func"), MeanFlowLoss(validate=False)):
        loss_fn(model, x, y)
    sample(model, y, steps=2)
    GraphSampler(model, steps=2)(y)
    assert value_check_calls == []
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 10\)"):  # the loss's own check
        MeanFlowLoss()(model, x, torch.tensor([1, 10, 0]))


def test_model_checks_what_the_caller_did_not(value_check_calls):
    """The model's value checks stay on where the caller's do not cover them: a loss set to another
    num_classes than the model's (its null label 12 is no label of the model), and ``sample`` over a
    wrapper without num_classes (which initial_noise cannot check labels for)."""
    model = _tiny()
    x = torch.randn(3, 4, 8, 8)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 10\] .*max 12"):
        MeanFlowLoss(num_classes=12, class_dropout=0.999)(model, x, torch.tensor([1, 2, 3]),
                                                         generator=torch.Generator().manual_seed(0))
    assert len(value_check_calls) == 1
    value_check_calls.clear()
    MeanFlowLoss(num_classes=12, validate=False, class_dropout=0.0)(model, x, torch.tensor([1, 2, 3]))
    assert value_check_calls == []  # validate=False: nothing reads a value
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 10\]"):
        sample(lambda z, r, t, y: model(z, r, t, y), torch.tensor([0, 11]), shape=(4, 8, 8))
    assert len(value_check_calls) == 1
