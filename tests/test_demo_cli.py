"""The meanflow-demo command line: every bad argument is a usage error (exit status 2, a message naming
the argument) before any work and before --out is created; the smallest run finishes in seconds."""
import json

import pytest
from safetensors.torch import safe_open

import meanflow_fast.demo as demo

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install -e '.[dev]')")


def _no_work(args):
    raise AssertionError("main() ran although the arguments are bad")


BAD_ARGS = [
    (["--steps", "0"], "--steps"),
    (["--steps", "x"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--samples-per-class", "5"], "--samples-per-class"),
    (["--preset", "B2"], "--preset"),
    (["--preset", "B/2"], "--preset"),  # a real preset, but not for 8×8 digits on a CPU
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--ema", "1"], "--ema"),
    (["--ratio-r-neq-t", "1.5"], "--ratio-r-neq-t"),
    (["--seed", str(2 ** 64)], "--seed"),
]


@pytest.mark.parametrize("argv,name", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_argument_is_a_usage_error_before_any_work(argv, name, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "main", _no_work)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        demo.cli(argv + ["--out", str(out), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "meanflow-demo: error: " in err and name in err, err
    assert not out.exists()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_that_cannot_be_a_directory_is_a_usage_error(where, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "main", _no_work)
    f = tmp_path / "file"
    f.write_text("keep")
    out = f if where == "file" else f / "sub"
    with pytest.raises(SystemExit) as e:
        demo.cli(["--out", str(out), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "meanflow-demo: error: " in err and "--out" in err, err
    assert f.read_text() == "keep"


def test_help_lists_the_presets_that_fit_the_digits(capsys):
    with pytest.raises(SystemExit) as e:
        demo.cli(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "{digits,tiny}" in out and "8×8" in out


def test_smallest_run_with_the_tiny_preset(tmp_path):
    out = tmp_path / "out"
    demo.cli(["--preset", "tiny", "--steps", "1", "--batch-size", "8", "--samples-per-class", "10",
              "--classifier-steps", "1", "--out", str(out), "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["preset"] == "tiny"
    for key in ("meanflow_1nfe", "flowmatching_1nfe", "meanflow_2nfe", "flowmatching_2nfe"):
        assert set(metrics[key]) == {"class_accuracy", "frechet_distance"}
    assert (out / "samples_meanflow_1nfe.png").is_file() and (out / "samples_flowmatching_1nfe.png").is_file()
    with safe_open(str(out / "meanflow_digits.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
    assert (config["input_size"], config["in_channels"], config["num_classes"]) == (8, 1, 10)
    assert config["hidden_size"] == 64  # the tiny preset's width
