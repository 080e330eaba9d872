"""The demo job end to end, with its default settings (a few minutes on 2 CPU cores): its outputs,
and the claims the README makes from them — 1-NFE MeanFlow samples, and 1-NFE iMF samples, are closer
to real digits than 1-NFE flow-matching samples of a network of the same size trained the same way."""
import json

import pytest
import torch
from safetensors.torch import load_file

from meanflow_fast import imf_dit, load_model, meanflow_dit
from meanflow_fast.demo import build_parser, main

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install -e '.[dev]')")


def test_demo_outputs_and_meanflow_beats_flow_matching(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path), "--quiet"])
    metrics = main(args)

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["meanflow_1nfe"] == metrics["meanflow_1nfe"]
    # The Fréchet distance of the held-out set to itself is 0: the metric's own sanity check.
    assert abs(metrics["real_heldout"]["frechet_distance"]) < 1e-6
    assert metrics["real_heldout"]["class_accuracy"] > 0.9  # the evaluation classifier works

    mf, fm = metrics["meanflow_1nfe"], metrics["flowmatching_1nfe"]
    assert mf["frechet_distance"] < fm["frechet_distance"]
    assert mf["class_accuracy"] > 0.8
    imf = metrics["imf_1nfe"]
    assert imf["frechet_distance"] < fm["frechet_distance"]
    assert imf["class_accuracy"] > 0.8
    for key in ("imf_1nfe", "imf_2nfe"):
        assert on_disk[key] == metrics[key] and set(metrics[key]) == {"class_accuracy", "frechet_distance"}

    from PIL import Image
    for name in ("meanflow", "flowmatching", "imf"):
        img = Image.open(tmp_path / f"samples_{name}_1nfe.png")
        assert img.size == ((10 * 9 + 1) * 4, (10 * 9 + 1) * 4)  # 10 classes × 10 samples of 8×8

    state = load_file(str(tmp_path / "meanflow_digits.safetensors"))
    model = meanflow_dit("digits")
    model.load_state_dict(state, strict=True)
    assert all(torch.isfinite(v).all() for v in state.values())

    state = load_file(str(tmp_path / "imf_digits.safetensors"))
    model = imf_dit("digits")
    model.load_state_dict(state, strict=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    loaded = load_model(str(tmp_path / "imf_digits.safetensors"))
    assert type(loaded).__name__ == "IMFDiT" and loaded.config == model.config
