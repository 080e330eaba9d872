"""IMFDiT's input checks (``IMFDiT._check_inputs``, through meanflow_fast.checks as MeanFlowDiT's): every bad
call of ``model(...)`` and ``model.forward_jvp(...)`` is a ValueError naming the argument and the value at
fault; valid edge values still run (against torch.func.jvp); the value checks are off inside
``skip_value_checks``, under torch.compile and during CUDA-graph capture, and are not repeated inside
IMFLoss, which checks its own draws."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import meanflow_fast.checks as checks
import meanflow_fast.imf.model as imf_model_mod
from meanflow_fast.imf import IMFLoss, imf_dit
from meanflow_fast.model import skip_value_checks
from tests.helpers import randomize_, rel_err

F64 = torch.float64
CALLS = ["forward", "forward_jvp"]


def _model(dtype=F64, **kw):
    """The tiny preset (B = 2 below: 4×8×8 latents, 10 classes), every parameter random."""
    return randomize_(imf_dit("tiny", **kw), std=0.15).to(dtype)


def _args(dtype=F64):
    return dict(z=torch.randn(2, 4, 8, 8, dtype=dtype), t=torch.tensor([0.8, 0.5], dtype=dtype), h=0.3,
                omega=2.0, t_min=0.2, t_max=0.7, y=torch.tensor([1, 10]))


def _call(model, kind, dz=None, **a):
    if kind == "forward":
        return model(**a)
    a.pop("heads", None)
    return model.forward_jvp(**a, dz=torch.randn(a["z"].shape).to(a["z"]) if dz is None else dz)


# ------------------------------------------------------------------------------- bad calls
# (id, change to the valid arguments above, message)
BAD = [
    ("t>1 float", dict(t=1.5), r"t must lie in \[0, 1\] \(0 ≤ h ≤ t ≤ 1\), got t.min\(\) = 1.5, t.max\(\) = 1.5 "
                               r"\(first at sample 0; outside at 2 of 2 samples\)"),
    ("t>1 tensor", dict(t=torch.tensor([0.5, 1.25], dtype=F64)),
     r"t must lie in \[0, 1\] .*t.min\(\) = 0.5, t.max\(\) = 1.25 \(first at sample 1; outside at 1 of 2"),
    ("t nan", dict(t=torch.tensor([0.5, float("nan")], dtype=F64)),
     r"t must lie in \[0, 1\] \(0 ≤ h ≤ t ≤ 1\), got NaN \(first at sample 1"),
    ("h<0", dict(h=-0.1), r"h must lie in \[0, 1\] \(0 ≤ h ≤ t ≤ 1\), got h.min\(\) = -0.1"),
    ("h nan", dict(h=float("nan")), r"h must lie in \[0, 1\] .*got NaN"),
    ("h>t", dict(h=torch.tensor([0.1, 0.9], dtype=F64)),
     r"h must be ≤ t for every sample \(0 ≤ h ≤ t ≤ 1\), got h = 0.9 > t = 0.5 at sample 1 \(h > t at 1 of 2"),
    ("omega<1", dict(omega=0.5), r"omega must be finite and ≥ 1 \(the guidance scale; 1 = no guidance\), got "
                                 r"omega = 0.5 at sample 0 \(out of range at 2 of 2 samples\)"),
    ("omega inf", dict(omega=torch.tensor([2.0, float("inf")], dtype=F64)),
     r"omega must be finite and ≥ 1 .*got omega = inf at sample 1 \(out of range at 1 of 2"),
    ("omega nan", dict(omega=torch.tensor([float("nan"), 3.0], dtype=F64)), r"omega must be .*got omega = nan at sample 0"),
    ("t_min>t_max", dict(t_min=0.9), r"t_min must be ≤ t_max for every sample \(0 ≤ t_min ≤ t_max ≤ 1\), got "
                                     r"t_min = 0.9 > t_max = 0.7 at sample 0 \(t_min > t_max at 2 of 2 samples\)"),
    ("t_max>1", dict(t_max=1.2), r"t_max must lie in \[0, 1\] \(0 ≤ t_min ≤ t_max ≤ 1\), got t_max.min\(\) = 1.2"),
    ("t_min<0", dict(t_min=torch.tensor([0.1, -0.1], dtype=F64)),
     r"t_min must lie in \[0, 1\] .*t_min.min\(\) = -0.1, t_min.max\(\) = 0.1 \(first at sample 1"),
    ("label num_classes+1", dict(y=torch.tensor([0, 11])),
     r"y must hold labels in \[0, 10\] \(10 = the null label, unconditional\), got min 0, max 11"),
    ("label -1", dict(y=torch.tensor([-1, 3])), r"y must hold labels in \[0, 10\] .*got min -1, max 3"),
    ("z float32", dict(z=torch.randn(2, 4, 8, 8)),
     r"z has dtype torch.float32 but the model's parameters are torch.float64: pass z.to\(torch.float64\) "
     r"or convert the model with model.to\(torch.float32\)"),
    ("z float16", dict(z=torch.randn(2, 4, 8, 8).half()), r"z has dtype torch.float16 but the model's parameters"),
    ("z int", dict(z=torch.zeros(2, 4, 8, 8, dtype=torch.long)), "z must be a floating-point tensor"),
    ("wrong C", dict(z=torch.randn(2, 3, 8, 8, dtype=F64)), r"z must have shape \(B, 4, 8, 8\), got \(2, 3, 8, 8\)"),
    ("wrong W", dict(z=torch.randn(2, 4, 8, 6, dtype=F64)), r"z must have shape \(B, 4, 8, 8\)"),
    ("empty", dict(z=torch.randn(0, 4, 8, 8, dtype=F64), y=torch.zeros(0, dtype=torch.long)), "empty batch"),
    ("y float", dict(y=torch.zeros(2)), r"y must be an integer tensor of shape \(2,\)"),
    ("y length", dict(y=torch.zeros(3, dtype=torch.long)), r"y must be an integer tensor of shape \(2,\)"),
    ("y device", dict(y=torch.tensor([1, 10], device="meta")), "y is on meta but z is on cpu"),
    ("t shape", dict(t=torch.rand(3, dtype=F64)), r"t must be a float, a 0-d tensor or shape \(2,\), got \(3,\)"),
    ("omega int", dict(omega=torch.tensor([2, 3])), "omega must be a floating-point tensor or a float"),
    ("t_max shape", dict(t_max=torch.ones(2, 1, dtype=F64)), r"t_max must be a float, a 0-d tensor or shape \(2,\)"),
]


@pytest.mark.parametrize("kind", CALLS)
@pytest.mark.parametrize("change,match", [pytest.param(c, m, id=i) for i, c, m in BAD])
def test_bad_call_is_a_value_error(kind, change, match):
    model = _model()
    args = _args()
    args.update(change)
    dz = torch.zeros(args["z"].shape, dtype=args["z"].dtype) if args["z"].is_floating_point() else None
    with pytest.raises(ValueError, match=match):
        _call(model, kind, dz=dz, **args)


def test_heads_are_checked():
    model = _model()
    with pytest.raises(ValueError, match=r"heads must be one of \('both', 'u', 'v'\), got 'w'"):
        model(**_args(), heads="w")
    u_only = _model(v_head=False)
    for heads in ("both", "v"):
        with pytest.raises(ValueError, match="needs the v-head"):
            u_only(**_args(), heads=heads)
    with pytest.raises(ValueError, match="needs the v-head"):
        _call(u_only, "forward_jvp", **_args())
    assert u_only(**_args(), heads="u").shape == (2, 4, 8, 8)


def test_forward_jvp_checks_its_tangents():
    model = _model()
    a = _args()
    with pytest.raises(ValueError, match=r"dz must be a tensor shaped like z \(2, 4, 8, 8\), got \(2, 4, 8, 7\)"):
        model.forward_jvp(**a, dz=torch.zeros(2, 4, 8, 7, dtype=F64))
    with pytest.raises(ValueError, match=r"dz must have z's dtype and device \(torch.float64 on cpu\), got "
                                         r"torch.float32 on cpu: pass dz.to\(z\)"):
        model.forward_jvp(**a, dz=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"dh must be a float, a 0-d tensor or shape \(2,\)"):
        model.forward_jvp(**a, dz=torch.zeros(2, 4, 8, 8, dtype=F64), dh=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"dt must be a float, a 0-d tensor or shape \(2,\)"):
        model.forward_jvp(**a, dz=torch.zeros(2, 4, 8, 8, dtype=F64), dt=torch.ones(3, dtype=F64))


# ------------------------------------------------------------------------------- valid edge values
@pytest.mark.parametrize("edge", ["t=1,h=1", "h=t", "t=h=0", "omega=1", "t_min=t_max", "interval [0, 1]",
                                  "null label", "mixed"])
def test_valid_edge_values_run(edge):
    """The ends of every range pass the checks: odd shapes, fp64, forward_jvp against torch.func.jvp over
    the forward's u-head."""
    model = randomize_(imf_dit("tiny", input_size=6, in_channels=3, hidden_size=48, num_heads=2, num_classes=7),
                       std=0.15).double()
    B = 3
    f64 = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    z, dz = torch.randn(B, 3, 6, 6, dtype=F64), torch.randn(B, 3, 6, 6, dtype=F64)
    a = dict(t=f64(0.6, 0.3, 0.9), h=f64(0.2, 0.1, 0.5), omega=f64(1.5, 3.0, 2.0), t_min=f64(0.1, 0.2, 0.3),
             t_max=f64(0.7, 0.8, 0.9), y=torch.randint(0, 7, (B,)))
    a.update({"t=1,h=1": dict(t=f64(1, 1, 1), h=f64(1, 1, 1)), "h=t": dict(h=a["t"]),
              "t=h=0": dict(t=f64(0, 0, 0), h=f64(0, 0, 0)), "omega=1": dict(omega=f64(1, 1, 1)),
              "t_min=t_max": dict(t_min=f64(0.4, 0.4, 1.0), t_max=f64(0.4, 0.4, 1.0)),
              "interval [0, 1]": dict(t_min=0.0, t_max=1.0), "null label": dict(y=torch.tensor([7, 0, 7])),
              "mixed": dict(t=f64(0, 0.5, 1), h=f64(0, 0.5, 0.25), omega=f64(1, 7, 1), t_min=f64(0, 0, 1),
                            t_max=f64(0, 1, 1), y=torch.tensor([7, 6, 0]))}[edge])
    dh = torch.randn(B, dtype=F64)
    u, u_dot, v = model.forward_jvp(z, **a, dz=dz, dh=dh)
    rest = {k: a[k] for k in ("omega", "t_min", "t_max", "y")}
    with sdpa_kernel([SDPBackend.MATH]):
        u_ref, u_dot_ref = torch.func.jvp(lambda z_, h_: model(z_, a["t"], h_, **rest, heads="u"),
                                          (z, torch.as_tensor(a["h"], dtype=F64).expand(B)), (dz, dh))
    assert rel_err(u, u_ref) <= 1e-10 and rel_err(u_dot, u_dot_ref) <= 1e-10
    assert rel_err(v, model(z, **a, heads="v")) <= 1e-10


def test_autocast_keeps_fp32_z_and_takes_the_autocast_dtype():
    """The dtype rule of MeanFlowDiT: fp32 z into an fp32 model is valid under bf16 autocast, and bf16 z
    is accepted there too (autocast casts it with the weights), not outside it."""
    model = _model(torch.float32)
    a = _args(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u32 = model(**a, heads="u")
        ub = model(**{**a, "z": a["z"].bfloat16()}, heads="u")
    assert u32.shape == ub.shape == a["z"].shape
    assert rel_err(ub, model(**a, heads="u")) <= 0.05  # bf16 against fp32
    with pytest.raises(ValueError, match="z has dtype torch.bfloat16 but the model's parameters are torch.float32"):
        model(**{**a, "z": a["z"].bfloat16()})
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="z has dtype torch.float16"):
        model(**{**a, "z": a["z"].half()})  # not the autocast dtype


# ------------------------------------------------------------------------------- when the value checks run
BAD_VALUES = dict(t=1.5, omega=0.5, t_min=0.9)  # out of range, yet the model computes with them


@pytest.fixture
def value_check_calls(monkeypatch):
    """How many times the iMF model ran its value checks (``check_values`` as imf/model.py calls it)."""
    calls = []
    orig = imf_model_mod.check_values

    def counted(*args, **kw):
        calls.append(args)
        return orig(*args, **kw)
    monkeypatch.setattr(imf_model_mod, "check_values", counted)
    return calls


def test_skip_value_checks_skips_them(value_check_calls):
    model = _model()
    bad = dict(_args(), **BAD_VALUES)
    for kind in CALLS:
        with pytest.raises(ValueError, match="t must lie in"):
            _call(model, kind, **bad)
    assert len(value_check_calls) == 2
    value_check_calls.clear()
    with skip_value_checks():
        for kind in CALLS:
            _call(model, kind, **bad)
        with pytest.raises(ValueError, match="z has dtype torch.float32"):  # structural checks stay
            model(**dict(bad, z=bad["z"].float()))
    assert value_check_calls == []
    with pytest.raises(ValueError, match="t must lie in"):  # and come back after the block
        model(**bad)


def test_value_checks_are_off_under_torch_compile(monkeypatch):
    model = _model()
    bad = dict(_args(), **BAD_VALUES)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for kind in CALLS:
        _call(model, kind, **bad)
    with pytest.raises(ValueError, match="z has dtype torch.float32"):
        model(**dict(bad, z=bad["z"].float()))


def test_value_checks_are_off_during_cuda_graph_capture(monkeypatch):
    """No host read is allowed while a CUDA graph is being captured (stubbed here: CPU only)."""
    model = _model()
    bad = dict(_args(), **BAD_VALUES)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(ValueError, match="t must lie in"):
        model(**bad)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not checks.value_checks_on()
    for kind in CALLS:
        _call(model, kind, **bad)


def test_compiled_forward_is_one_graph_with_bad_values():
    """fullgraph=True: the checks add no graph break, and out-of-range values are not read under compile."""
    torch._dynamo.reset()
    model = _model(torch.float32)
    bad = dict(_args(torch.float32), **BAD_VALUES)
    u = torch.compile(lambda **a: model(**a, heads="u"), backend="eager", fullgraph=True)(**bad)
    with skip_value_checks():
        assert torch.equal(u, model(**bad, heads="u"))


def test_loss_does_not_repeat_the_value_checks(value_check_calls):
    """IMFLoss checks its draws itself (one sync) and runs the model inside skip_value_checks, whatever its
    jvp mode; with another num_classes than the model's its checks do not cover the model's, which run."""
    model = _model(torch.float32)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 9, 0])
    for loss_fn in (IMFLoss(), IMFLoss(jvp="func"), IMFLoss(jvp="fd"), IMFLoss(validate=False)):
        loss_fn(model, x, y)
    assert value_check_calls == []
    IMFLoss(num_classes=9)(model, x, torch.tensor([1, 8, 0]))
    assert len(value_check_calls) >= 1
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 10\)"):  # the loss's own check
        IMFLoss()(model, x, torch.tensor([1, 10, 0]))


def test_fd_points_pass_the_models_checks(monkeypatch, value_check_calls):
    """jvp="fd" shifts t; every shifted point (rows at t = 1, near 1, r = t, r = t = 1) passes the model's
    own checks, forced on inside the loss."""
    monkeypatch.setattr(imf_model_mod, "value_checks_on", lambda: True)
    model = randomize_(imf_dit("digits"), std=0.15)
    B = 5
    t = torch.tensor([1.0, 1.0 - 1e-3, 0.999, 0.5, 1.0])
    r = torch.tensor([0.5, 0.2, 0.999, 0.5, 1.0])
    loss, _ = IMFLoss(jvp="fd")(model, torch.randn(B, 1, 8, 8), torch.zeros(B, dtype=torch.long), t=t, r=r)
    assert torch.isfinite(loss)
    assert len(value_check_calls) >= 3  # guidance, primal and the shifted points, all checked
