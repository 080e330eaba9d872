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
