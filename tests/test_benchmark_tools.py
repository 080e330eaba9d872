"""The CPU-testable pieces of benchmarks/: the attention ratio table read from pytest-benchmark JSON, the
model ratio table's order, ratios, --skip and incremental JSON (benchmarks/report.py), and the host
overhead tool (benchmarks/tools/host_overhead.py)."""
import json

import pytest
import torch

from benchmarks import attention_table, report


def _bench(shape, provider, ms, tflops, config=None, **speedups):
    info = dict(ms_per_call=ms, tflops=tflops, **{f"speedup_vs_{k}": v for k, v in speedups.items()})
    if config is not None:
        info["config"] = config
    return {"params": {"shape_name": shape, "provider": provider}, "extra_info": info}


def test_attention_table_rows_and_ratios(tmp_path, capsys):
    report = {"datetime": "2026-11-26T10:00:00", "benchmarks": [
        _bench("B2-b128", "torch_jvp_math", 6.0, 20.0),
        _bench("B2-b128", "jvp_flash_attention", 2.0, 60.0, torch_jvp_math=3.0),
        _bench("B2-b128", "triton_fwd+tangent", 0.8, 150.0, "BM64 BN32 w4 s3", torch_jvp_math=7.5,
               jvp_flash_attention=2.5),
        {"params": {"shape_name": "B2-b128", "provider": "flash_fwd"}, "extra_info": {}},  # a skipped case
    ]}
    path = tmp_path / "attention.json"
    path.write_text(json.dumps(report))
    assert attention_table.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in lines if ln.startswith("B2-b128")]
    assert [r[1] for r in rows] == ["torch_jvp_math", "jvp_flash_attention", "triton_fwd+tangent"]
    assert rows[2][2:] == ["0.800", "150.0", "7.50×", "2.50×", "BM64", "BN32", "w4", "s3"]
    assert rows[0][4:] == ["—", "—"]


def test_attention_table_usage(capsys, tmp_path):
    assert attention_table.main([]) == 2
    assert attention_table.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read the pytest-benchmark JSON" in capsys.readouterr().err
    (tmp_path / "cut.json").write_text('{"benchmarks": [')  # a file cut short
    assert attention_table.main([str(tmp_path / "cut.json")]) == 2


# Fake timings (ms, peak MB) per row; each fake "fn" is its row's name, so a row's figures are known
# without running anything.
_FAKE = {"forward eager": (30.0, 800), "forward compiled": (15.0, 600), "forward_jvp triton": (33.0, 1200),
         "forward triton": (18.0, 700), "forward_jvp torch": (200.0, 3000), "torch.func.jvp eager": (180.0, 4000),
         "FM step compiled": (50.0, 10000), "FM step eager": (100.0, 16000),
         "MeanFlow step triton": (65.0, 10500), "MeanFlow step triton compiled": (60.0, 9000)}


@pytest.fixture
def fake_report(monkeypatch):
    """report.model_table with nothing measured: every builder returns its row's name as the "fn" and the
    timing helpers look it up in _FAKE. Returns the list of rows in the order they were timed."""
    timed = []
    monkeypatch.setattr(report, "build_model", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(report, "model_inputs", lambda *a, **k: None)
    compiled = type("Compiled", (torch.nn.Identity,), {})
    monkeypatch.setattr(report.torch, "compile", lambda m: compiled())
    monkeypatch.setattr(report, "forward_fn", lambda m, inp, backend: "forward triton" if backend == "triton"
                        else ("forward compiled" if isinstance(m, compiled) else "forward eager"))
    monkeypatch.setattr(report, "forward_jvp_fn", lambda m, inp, backend: f"forward_jvp {backend}")
    monkeypatch.setattr(report, "func_jvp_fn", lambda m, inp: "torch.func.jvp eager")
    steps = {(False, False): "FM step eager", (False, True): "FM step compiled",
             (True, False): "MeanFlow step triton", (True, True): "MeanFlow step triton compiled"}
    monkeypatch.setattr(report, "train_step_fn", lambda m, b, meanflow, compiled=False: steps[meanflow, compiled])
    monkeypatch.setattr(report, "timed_first_call", lambda fn: timed.append(fn) or 1.0)
    monkeypatch.setattr(report, "cuda_time_ms", lambda fn, warmup, iters: _FAKE[fn][0])
    monkeypatch.setattr(report, "peak_memory_mb", lambda fn: _FAKE[fn][1])
    monkeypatch.setattr(report.torch.cuda, "empty_cache", lambda: None)
    return timed


def test_model_table_must_show_rows_first_and_ratios_by_hand(fake_report):
    snapshots = []
    rows = {}
    report.model_table("B/2", 4, quick=False, dtype=torch.float32, rows=rows, save=lambda: snapshots.append(dict(rows)))
    must = ["forward eager", "forward compiled", "forward_jvp triton"]
    assert fake_report[:3] == must
    # the steps in the first H100 run's order (the memory ratio depends on what is alive)
    assert fake_report[-4:] == ["FM step eager", "FM step compiled", "MeanFlow step triton",
                                "MeanFlow step triton compiled"]
    assert sorted(fake_report) == sorted(_FAKE)
    # worked by hand from _FAKE
    assert rows["jvp_over_eager_forward"] == 1.1 and rows["jvp_over_compiled_forward"] == 2.2
    assert rows["triton_forward_over_eager_forward"] == 0.6 and rows["triton_forward_over_compiled_forward"] == 1.2
    assert rows["mf_step_over_compiled_fm"] == 1.3 and rows["mf_mem_over_compiled_fm"] == 1.05
    assert rows["mf_step_over_eager_fm"] == 0.65 and rows["mf_compiled_step_over_compiled_fm"] == 1.2
    assert rows["forward_jvp triton"]["tflops"] == round(report.dit_jvp_flops("B/2", 4) / 33e-3 / 1e12, 1)
    # saved after every row: the JVP ratios were on disk before the first train-step row was timed
    after_jvp = next(s for s in snapshots if "forward_jvp triton" in s and "jvp_over_compiled_forward" in s)
    assert "jvp_over_compiled_forward" in after_jvp and "FM step compiled" not in after_jvp
    assert len(snapshots) >= len(_FAKE)


def test_model_table_skip_and_flags(fake_report):
    rows = {}
    report.model_table("B/2", 4, quick=True, dtype=torch.float32, compiled_step=False,
                       skip=("FM step eager", "forward triton"), rows=rows)
    assert "torch.func.jvp eager" not in fake_report and "MeanFlow step triton compiled" not in fake_report
    assert "FM step eager" not in rows and "forward triton" not in rows
    assert "mf_step_over_eager_fm" not in rows and "triton_forward_over_eager_forward" not in rows
    assert rows["mf_step_over_compiled_fm"] == 1.3


def test_report_skip_names_the_allowed_rows(capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--device", "cpu", "--skip", "forward eager"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--skip" in err and "'forward eager'" in err and "'FM step eager'" in err


def test_report_skip_takes_names_without_spaces(fake_report, monkeypatch, tmp_path):
    """--skip forward-jvp-torch,FM_step_eager (as a shell variable passes it) reaches model_table as the
    rows' real names; the JSON at --out holds the table."""
    seen = {}
    real = report.model_table
    monkeypatch.setattr(report, "model_table", lambda *a, **k: seen.update(skip=a[5]) or real(*a, **k))
    monkeypatch.setattr(report.common, "select_device", lambda device, script: True)
    out = tmp_path / "r.json"
    assert report.main(["--device", "cpu", "--cases", "B/2:4", "--sampler", "no", "--out", str(out),
                        "--skip", "forward-jvp-torch,FM_step_eager"]) == 0
    assert sorted(seen["skip"]) == ["FM step eager", "forward_jvp torch"]
    table = json.loads(out.read_text())["B/2 b4"]
    assert "forward_jvp torch" not in table and "FM step eager" not in table
    assert table["jvp_over_compiled_forward"] == 2.2


def test_host_overhead_runs_each_call_and_backend():
    """benchmarks/tools/host_overhead.py in its own process (it stubs Triton's launches process-wide): one row
    per (call, backend) with a positive time; a bad --calls is a usage error naming the allowed calls."""
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "benchmarks.tools.host_overhead", "--preset", "tiny", "--reps", "1",
           "--calls-per-rep", "1"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = re.findall(r"^  (\w+)\s+(triton|torch)\s+([\d.]+) ms", p.stdout, re.M)
    assert {(c, b) for c, b, _ in rows} == {(c, b) for c in ("forward", "forward_jvp", "mf_step", "fm_step")
                                            for b in ("triton", "torch")}, p.stdout
    assert all(float(ms) > 0 for _, _, ms in rows)
    bad = subprocess.run(cmd + ["--calls", "forward,backward"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown ['backward']" in bad.stderr and "fm_step" in bad.stderr, bad.stderr


# ---------------------------------------------------------------------------------------------------- iMF
# Fake timings of the iMF table (ms, peak MB), as _FAKE.
_FAKE_IMF = {"forward eager": (30.0, 800), "forward compiled": (12.0, 600), "forward_jvp triton": (27.0, 1200),
             "torch.func.jvp compiled": (54.0, 5000), "forward triton": (24.0, 700),
             "forward_jvp torch": (90.0, 3000), "torch.func.jvp eager": (180.0, 4000),
             "FM step eager": (100.0, 16000), "FM step compiled": (50.0, 10000),
             "iMF step triton": (60.0, 10500), "iMF step triton compiled": (65.0, 12000)}


@pytest.fixture
def fake_imf_report(monkeypatch):
    """report.imf_table with nothing measured, as ``fake_report``: every builder returns its row's name."""
    timed = []
    monkeypatch.setattr(report, "build_imf_model", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(report, "imf_inputs", lambda *a, **k: None)
    compiled = type("Compiled", (torch.nn.Identity,), {})
    monkeypatch.setattr(report.torch, "compile",
                        lambda m: compiled() if isinstance(m, torch.nn.Module) else m.replace("eager", "compiled"))
    monkeypatch.setattr(report, "imf_forward_fn", lambda m, inp, backend=None: "forward triton" if backend == "triton"
                        else ("forward compiled" if isinstance(m, compiled) else "forward eager"))
    monkeypatch.setattr(report, "imf_forward_jvp_fn", lambda m, inp, backend: f"forward_jvp {backend}")
    monkeypatch.setattr(report, "imf_func_jvp_fn", lambda m, inp: "torch.func.jvp eager")
    steps = {(False, False): "FM step eager", (False, True): "FM step compiled",
             (True, False): "iMF step triton", (True, True): "iMF step triton compiled"}
    monkeypatch.setattr(report, "imf_train_step_fn", lambda m, b, imf, compiled=False: steps[imf, compiled])
    monkeypatch.setattr(report, "timed_first_call", lambda fn: timed.append(fn) or 1.0)
    monkeypatch.setattr(report, "cuda_time_ms", lambda fn, warmup, iters: _FAKE_IMF[fn][0])
    monkeypatch.setattr(report, "peak_memory_mb", lambda fn: _FAKE_IMF[fn][1])
    monkeypatch.setattr(report.torch.cuda, "empty_cache", lambda: None)
    return timed


def test_imf_table_rows_ratios_and_targets_by_hand(fake_imf_report, capsys):
    snapshots = []
    rows = {}
    report.imf_table("B/2", 4, quick=False, dtype=torch.float32, rows=rows, save=lambda: snapshots.append(dict(rows)))
    assert fake_imf_report[:3] == ["forward eager", "forward compiled", "forward_jvp triton"]
    assert fake_imf_report[-4:] == ["FM step eager", "FM step compiled", "iMF step triton", "iMF step triton compiled"]
    assert sorted(fake_imf_report) == sorted(_FAKE_IMF)
    # the targets, stored with the table
    assert rows["targets"] == {"jvp_over_eager_forward": 1.0, "jvp_over_compiled_forward": 2.0,
                               "imf_step_over_compiled_fm": 1.35, "imf_mem_over_compiled_fm": 1.1}
    # worked by hand from _FAKE_IMF
    assert rows["jvp_over_eager_forward"] == 0.9 and rows["jvp_over_compiled_forward"] == 2.25
    assert rows["jvp_over_compiled_func_jvp"] == 0.5 and rows["triton_forward_over_eager_forward"] == 0.8
    assert rows["imf_step_over_compiled_fm"] == 1.2 and rows["imf_mem_over_compiled_fm"] == 1.05
    assert rows["imf_step_over_eager_fm"] == 0.6 and rows["imf_compiled_step_over_compiled_fm"] == 1.3
    assert rows["imf_compiled_mem_over_compiled_fm"] == 1.2
    assert rows["forward_jvp triton"]["tflops"] == round(report.imf_jvp_flops("B/2", 4) / 27e-3 / 1e12, 1)
    out = capsys.readouterr().out
    line = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip() and ln.split()[0] in rows}
    assert "target ≤ 1.00×: met" in line["jvp_over_eager_forward"]
    assert "target ≤ 2.00×: MISSED" in line["jvp_over_compiled_forward"]
    assert "target ≤ 1.35×: met" in line["imf_step_over_compiled_fm"]
    assert "target ≤ 1.10×: met" in line["imf_mem_over_compiled_fm"]
    assert "target" not in line["imf_compiled_mem_over_compiled_fm"]
    # the JVP ratios were saved before any step row was timed
    after_jvp = next(s for s in snapshots if "jvp_over_compiled_forward" in s)
    assert "FM step eager" not in after_jvp


def test_imf_table_failed_row_leaves_targets_unmeasured(fake_imf_report, monkeypatch, capsys):
    """A backend that cannot run (IMFDiT without its triton ops raised NotImplementedError) is a FAILED row
    with its reason; the ratios it enters are printed as not measured, not left out silently."""
    def no_triton(fn, warmup, iters):
        if "triton" in fn:
            raise NotImplementedError("backend='triton' is not wired")
        return _FAKE_IMF[fn][0]
    monkeypatch.setattr(report, "cuda_time_ms", no_triton)
    rows = {}
    report.imf_table("B/2", 4, quick=True, dtype=torch.float32, compiled_step=False, rows=rows)
    assert "NotImplementedError" in rows["forward_jvp triton"]["error"]
    assert "jvp_over_eager_forward" not in rows and "imf_step_over_compiled_fm" not in rows
    assert "torch.func.jvp eager" not in fake_imf_report and "iMF step triton compiled" not in fake_imf_report
    out = capsys.readouterr().out
    assert "jvp_over_eager_forward" in out and "target ≤ 1.00×: not measured" in out
    assert "target ≤ 1.35×: not measured" in out


def test_shared_table_rows_targets_and_saves_by_hand(monkeypatch, capsys):
    """report._Table, which the DiT and the iMF table both run on: rows timed unless skipped (by name, by
    quick, by compiled_step), each ratio printed with its target (an upper bound: met at equality) or
    without one, a target whose rows are missing printed as not measured, the rows saved after every call."""
    fake = {"a": (20.0, 300), "b": (10.0, 200), "c": (8.0, 600), "d": (1.0, 1), "torch.func.jvp eager": (1.0, 1)}
    monkeypatch.setattr(report, "timed_first_call", lambda fn: 1.5)
    monkeypatch.setattr(report, "cuda_time_ms", lambda fn, warmup, iters: fake[fn][0])
    monkeypatch.setattr(report, "peak_memory_mb", lambda fn: fake[fn][1])
    rows, saved = {}, []
    table = report._Table("T b3", rows, lambda: saved.append(dict(rows)), skip=("c",), quick=True,
                          compiled_step=False, compiled_step_row="d",
                          targets={"a_over_b": 2.0, "b_over_a": 0.4, "a_mem_over_b": 1.4, "a_over_c": 3.0})
    for name in fake:
        table.measure(name, name)
    table.ratio("a_over_b", "a", "b")                        # 20 / 10 = 2.0 ≤ 2.0
    table.ratio("b_over_a", "b", "a")                        # 10 / 20 = 0.5 > 0.4
    table.ratio("a_mem_over_b", "a", "b", num_key="peak_mb")  # 300 / 200 = 1.5 > 1.4
    table.ratio("plain", "b", "a")                           # no target
    table.ratio("a_over_c", "a", "c")                        # c skipped, target 3
    table.ratio("c_over_b", "c", "b")                        # c skipped, no target: nothing at all
    assert table.rows is rows
    assert rows == {"a": {"ms": 20.0, "peak_mb": 300, "first_call_s": 1.5},
                    "b": {"ms": 10.0, "peak_mb": 200, "first_call_s": 1.5},
                    "a_over_b": 2.0, "b_over_a": 0.5, "a_mem_over_b": 1.5, "plain": 0.5}
    assert len(saved) == 2 + 6 and saved[1] == {"a": rows["a"], "b": rows["b"]}
    lines = [" ".join(ln.split()) for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines[0] == "== T b3 ==" and len(lines) == 1 + 2 + 5
    assert lines[3:] == ["a_over_b 2.000× target ≤ 2.00×: met",
                         "b_over_a 0.500× target ≤ 0.40×: MISSED",
                         "a_mem_over_b 1.500× target ≤ 1.40×: MISSED",
                         "plain 0.500×",
                         "a_over_c — target ≤ 3.00×: not measured (no ms of 'a' or 'c')"]


def test_report_cases_route_imf_and_keep_the_dit_default(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(report, "model_table", lambda preset, batch, *a: calls.append(("dit", preset, batch)))
    monkeypatch.setattr(report, "imf_table", lambda preset, batch, *a: calls.append(("imf", preset, batch)))
    monkeypatch.setattr(report.common, "select_device", lambda device, script: True)
    out = str(tmp_path / "r.json")
    assert report.main(["--device", "cpu", "--sampler", "no", "--out", out,
                        "--cases", "iMF-B/2:128,iMF-XL/2:64", "B/2:4"]) == 0
    assert calls == [("imf", "B/2", 128), ("imf", "XL/2", 64), ("dit", "B/2", 4)]
    assert set(json.loads(open(out).read())) >= {"iMF-B/2 b128", "iMF-XL/2 b64", "B/2 b4"}
    calls.clear()
    assert report.main(["--device", "cpu", "--sampler", "no", "--out", out]) == 0
    assert calls == [("dit", "B/2", 128), ("dit", "XL/2", 64)]  # the default: the DiT cases only
    for bad, words in ((["--cases", "iMF-Q/9:4"], ["unknown iMF preset", "iMF-XL/2"]),
                       (["--cases", "iMF-B/2"], ["'iMF-B/2' is not preset:batch"]),
                       (["--cases", "B/2:0"], ["batch a positive integer"]),
                       (["--cases", "iMF-tiny:2"], ["--sampler", "--sampler no"])):
        with pytest.raises(SystemExit) as e:
            report.main(["--device", "cpu", "--out", out] + bad)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err


def _stub_v_net(calls):
    """A stand-in network: v = 2·z, recording how it was called."""
    def net(z, t, h, omega, t_min, t_max, y, heads="both"):
        calls.append(dict(t=t, h=h, omega=omega, t_min=t_min, t_max=t_max, y=y, heads=heads))
        return 2 * z
    return net


def test_imf_fm_loss_by_hand():
    """z = (1 − t)x + tε, loss = mean (v(z) − (ε − x))² with v = 2z, worked by hand:
    row 0: x 1, ε 3, t 0.25 → z 1.5, v 3, target 2, error² 1; row 1: x 2, ε −1, t 0.5 → z 0.5, v 1,
    target −3, error² 16; mean 8.5. The network is called on the v-head at h = 0, ω = 1, [0, 1]."""
    from benchmarks.common import imf_fm_loss
    calls = []
    x = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    eps = torch.tensor([3.0, -1.0]).view(2, 1, 1, 1)
    t, y = torch.tensor([0.25, 0.5]), torch.tensor([3, 7])
    loss = imf_fm_loss(_stub_v_net(calls), x, y, t, eps)
    assert loss.item() == 8.5
    (c,) = calls
    assert c["heads"] == "v" and torch.equal(c["y"], y) and torch.equal(c["t"], t)
    assert c["h"].tolist() == [0, 0] and c["omega"].tolist() == [1, 1]
    assert c["t_min"].tolist() == [0, 0] and c["t_max"].tolist() == [1, 1]


def test_imf_train_steps_on_the_tiny_model(monkeypatch):
    """The FM step trains the trunk and the v-head only (the u-head gets no gradient); the iMF step (IMFLoss,
    torch backend) trains the u-head too. Both on CPU in fp32."""
    from benchmarks import common
    monkeypatch.setattr(common, "DEVICE", "cpu")
    for imf, u_moves in ((False, False), (True, True)):
        model = common.build_imf_model("tiny", dtype=torch.float32)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        common.imf_train_step_fn(model, 3, imf=imf)()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert any(n.startswith("trunk.") for n in moved) and any(n.startswith("v_blocks.") for n in moved)
        assert any(n.startswith("u_blocks.") for n in moved) == u_moves, sorted(moved)


def test_imf_flops_by_hand():
    """iMF-B/2 b1: N = 20 + 256 = 276, D 768, SwiGLU hidden 2048, depth 12 with heads of 8 blocks.
    A block's primal linears 8·N·D² + 6·N·D·2048, attention 4·N²·D."""
    lin, att = 8 * 276 * 768**2 + 6 * 276 * 768 * 2048, 4 * 276**2 * 768
    assert report.imf_forward_flops("B/2", 1) == 20 * (lin + att)
    assert report.imf_jvp_flops("B/2", 1) == 12 * (2 * lin + 3 * att) + 8 * (lin + att)


# ---------------------------------------------------------------------------------------------------- iMF ops
_IMF_SHAPE = dict(B=2, N=37, D=128, HEADS=2, HEAD_DIM=64, HIDDEN=170)


def _primals_tangents(op, provider, out):
    """(primal outputs, tangents) of a benchmark provider's return value, whatever its layout."""
    def listed(v):
        return list(v) if isinstance(v, (tuple, list)) else [v]
    if provider == "torch_jvp":
        return listed(out[0]), listed(out[1])
    if provider in ("ref_fwd", "ref_math_fwd"):
        return listed(out), None
    if op in ("gated_residual_rmsnorm", "qk_norm_rope"):  # (a, ȧ, b, ḃ)
        return list(out[0::2]), list(out[1::2])
    return [out[0]], [out[1]]


@pytest.mark.parametrize("op", ["rms_norm", "gated_residual_rmsnorm", "qk_norm_rope", "swiglu", "attention"])
def test_imf_ops_bench_providers_agree(op):
    """benchmarks/bench_imf_ops.py's providers at small fp32 shapes (Triton's interpreter): the fused kernel,
    torch.func.jvp of the reference and the explicit rules give one (y, ẏ); the forward-only providers y."""
    from benchmarks import bench_imf_ops as bench
    args = bench.make_inputs(op, _IMF_SHAPE, dtype=torch.float32, device="cpu", seed=1)
    want_p, want_t = _primals_tangents(op, "jvp_ref", bench.op_fn(op, "jvp_ref", args)())
    tol = dict(rtol=1e-3, atol=1e-3) if op in ("swiglu", "attention") else dict(rtol=1e-4, atol=1e-5)
    providers = bench.PROVIDERS + (["ref_math_fwd"] if op == "attention" else [])
    for provider in providers:
        got_p, got_t = _primals_tangents(op, provider, bench.op_fn(op, provider, args)())
        assert len(got_p) == len(want_p), provider
        for g, w in zip(got_p, want_p):
            torch.testing.assert_close(g.detach(), w.detach(), **tol, msg=f"{op} {provider} primal")
        if got_t is not None:
            for g, w in zip(got_t, want_t):
                torch.testing.assert_close(g, w, **tol, msg=f"{op} {provider} tangent")
    assert args[0].requires_grad and not args[-1].requires_grad  # primal inputs need grad, tangents not


def test_imf_ops_work_by_hand():
    from benchmarks.bench_imf_ops import work
    s = dict(B=1, N=2, D=3, HEADS=1, HEAD_DIM=3, HIDDEN=4)
    assert work("rms_norm", "triton", s, 2) == (48, "GB/s")          # x, ẋ, y, ẏ: 4 × 6 values × 2 B
    assert work("rms_norm", "ref_fwd", s, 2) == (24, "GB/s")
    assert work("gated_residual_rmsnorm", "jvp_ref", s, 4) == (192, "GB/s")  # 8 tensors × 6 × 4 B
    assert work("swiglu", "triton", s, 2) == (288, "TFLOP/s")        # 2 streams × 3 GEMMs × 2 × (2·3·4)
    assert work("attention", "torch_jvp", s, 2) == (144, "TFLOP/s")  # 3 × 4·N²·D = 3 × 48
    assert work("attention", "ref_math_fwd", s, 2) == (48, "TFLOP/s")
    with pytest.raises(ValueError, match="op must be one of"):
        work("layernorm", "triton", s, 2)


def test_imf_shape_by_hand():
    """The iMF cases' op shapes from the presets: 8 class + 4 ω + 2·2 interval + 4 time prefix tokens and 16²
    patches; SwiGLU hidden int(8/3·D)."""
    from benchmarks.common import imf_shape
    assert imf_shape("B/2", 128) == dict(B=128, N=276, D=768, HEADS=12, HEAD_DIM=64, HIDDEN=2048)
    assert imf_shape("XL/2", 64) == dict(B=64, N=276, D=1024, HEADS=16, HEAD_DIM=64, HIDDEN=2730)


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_qkv_bench_layouts_match_the_projections_by_hand(pass_):
    """benchmarks/bench_imf_ops.py's q, k, v A/B at a small fp32 shape (the dual linear in Triton's interpreter):
    the separate and the packed layout both give q = x Wqᵀ, q̇ = ẋ Wqᵀ (k, v alike) and, with the backward,
    dx = Σ dq Wq and dWq = Σ_rows dqᵀ x, computed here in fp64; the packed call concatenates the weights at
    each call (a weight changed after the call was built is used)."""
    from benchmarks import bench_imf_ops as bench
    args = bench.qkv_inputs(dict(B=2, N=5, D=24), dtype=torch.float32, device="cpu", seed=3)
    x, x_dot, weights, grads = args
    x64, xd64 = x.detach().double(), x_dot.double()
    w64, g64 = [w.detach().double() for w in weights], [g.double() for g in grads]
    want_y, want_t = [x64 @ w.T for w in w64], [xd64 @ w.T for w in w64]
    want_dx = sum(g @ w for g, w in zip(g64, w64))
    want_dw = [g.flatten(0, 1).T @ x64.flatten(0, 1) for g in g64]
    tol = dict(rtol=1e-4, atol=1e-5)
    for layout in bench.QKV_LAYOUTS:
        out = bench.qkv_fn(layout, pass_, args)()
        assert len(out) == (2 if pass_ == "fwd" else 3), layout
        for got, want in zip(out[0] + out[1], want_y + want_t):
            torch.testing.assert_close(got.detach().double(), want, **tol, msg=layout)
        if pass_ == "fwd_bwd":
            dx, *dw = out[2]
            torch.testing.assert_close(dx.double(), want_dx, **tol, msg=layout)
            for got, want in zip(dw, want_dw):
                torch.testing.assert_close(got.double(), want, **tol, msg=layout)
    packed = bench.qkv_fn("packed", "fwd", args)
    with torch.no_grad():
        weights[1].mul_(-2.0)
    torch.testing.assert_close(packed()[0][1].detach().double(), -2 * want_y[1], **tol)


def test_qkv_bench_work_and_names_by_hand():
    from benchmarks import bench_imf_ops as bench
    s = dict(B=1, N=2, D=3)
    assert bench.qkv_work("fwd", s) == 216       # 3 projections × 2·(1·2)·3² × 2 streams
    assert bench.qkv_work("fwd_bwd", s) == 432   # + dx and dW of the primal
    args = bench.qkv_inputs(s, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="layout must be one of"):
        bench.qkv_fn("fused", "fwd", args)
    with pytest.raises(ValueError, match="pass_ must be one of"):
        bench.qkv_fn("packed", "bwd", args)
    with pytest.raises(ValueError, match="pass_ must be one of"):
        bench.qkv_work("bwd", s)


# ---------------------------------------------------------------------------------------------------- gpu_check
def test_gpu_check_imf_phase_dry_run(tmp_path):
    """``DRY=1 gpu_check.sh imf`` on this CPU machine: the per-op benchmarks skip without CUDA, the iMF table
    runs at iMF-tiny batch 2 and lands in $OUT as JSON and log, with the targets beside the ratios. torch.compile
    is off (TORCHDYNAMO_DISABLE: the dry run checks the script's wiring, not inductor) and the optional rows
    are skipped, to keep the run short. A triton row either ran or failed with the backend's
    NotImplementedError (the iMF triton backend wired or not)."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    env = dict(os.environ, DRY="1", OUT=str(out), TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               IMF_REPORT_ARGS="--skip forward-triton,torch.func.jvp-compiled,iMF-step-triton-compiled")
    p = subprocess.run(["bash", "benchmarks/tools/gpu_check.sh", "imf"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "skipped" in (out / "imf_ops.log").read_text()
    log = (out / "imf_report.log").read_text()
    assert "== iMF-tiny batch 2" in log and "target ≤ 1.00×" in log and "target ≤ 1.35×" in log
    table = json.loads((out / "imf_results.json").read_text())["iMF-tiny b2"]
    assert table["targets"]["imf_step_over_compiled_fm"] == 1.35
    for row in ("forward eager", "forward compiled", "forward_jvp torch", "FM step eager", "FM step compiled"):
        assert table[row]["ms"] > 0, (row, table[row])
    for row in ("forward_jvp triton", "iMF step triton"):
        assert "ms" in table[row] or "NotImplementedError" in table[row]["error"], (row, table[row])
    if "ms" in table["forward_jvp triton"]:
        assert table["jvp_over_eager_forward"] > 0
    assert "forward triton" not in table and "iMF step triton compiled" not in table
    bad = subprocess.run(["bash", "benchmarks/tools/gpu_check.sh", "nope"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and " imf " in bad.stdout, bad.stdout


# ---------------------------------------------------------------------------------------------------- SwiGLU bwd
def test_swiglu_bwd_bench_providers_match_the_formulas_in_fp64():
    """benchmarks/bench_imf_ops.py's SwiGLU backward case at a small fp32 shape with an odd width (the kernel in
    Triton's interpreter): every provider's (da, db, g) is da = dg·b·σ(a)·(1 + a·(1 − σ(a))), db = dg·a·σ(a),
    g = a·σ(a)·b, with σ(a) = 1 / (1 + e^−a), computed here in fp64."""
    from benchmarks import bench_imf_ops as bench
    shape = dict(B=3, N=7, D=16, HEADS=1, HEAD_DIM=16, HIDDEN=37)
    args = bench.swiglu_bwd_inputs(shape, dtype=torch.float32, device="cpu", seed=5)
    assert [tuple(t.shape) for t in args] == [(21, 37)] * 3
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in args)
    dg, a, b = (t.double() for t in args)
    sig = 1 / (1 + torch.exp(-a))
    want = (dg * b * sig * (1 + a * (1 - sig)), dg * a * sig, a * sig * b)
    for provider in bench.SWIGLU_BWD_PROVIDERS:
        got = bench.swiglu_bwd_fn(provider, args)()
        assert len(got) == 3, provider
        for name, g, w in zip(("da", "db", "g"), got, want):
            assert g.dtype == torch.float32, (provider, name)
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6, msg=f"{provider} {name}")


def test_swiglu_bwd_bench_work_and_names_by_hand():
    from benchmarks import bench_imf_ops as bench
    assert bench.swiglu_bwd_work(dict(B=1, N=2, HIDDEN=4), 2) == 96    # dg, a, b, da, db, g: 6 × 8 values × 2 B
    assert bench.swiglu_bwd_work(dict(B=3, N=5, HIDDEN=7), 4) == 2520  # 6 × 105 × 4 B
    args = bench.swiglu_bwd_inputs(dict(B=1, N=2, HIDDEN=4), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="provider must be one of"):
        bench.swiglu_bwd_fn("cuda", args)
