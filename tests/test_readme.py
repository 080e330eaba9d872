"""The README's "API" and "Improved MeanFlow (iMF)" examples run as written (a user copies them first)."""
from pathlib import Path

import torch

from tests.helpers import fenced_blocks

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs_as_written():
    blocks = [b.code for b in fenced_blocks(README.read_text(encoding="utf-8")) if b.lang == "python"]
    assert blocks, "README.md has no python example"
    scope = {}
    exec(compile(blocks[0], "README.md (API example)", "exec"), scope)
    assert torch.isfinite(scope["loss"]).item()
    assert scope["images"].shape == scope["latents"].shape
    assert scope["u"].shape == scope["dudt"].shape == scope["latents"].shape


def test_readme_imf_example_runs_as_written():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Improved MeanFlow (iMF)"):]
    section = section[: section.index("\n### ")]
    blocks = [b.code for b in fenced_blocks(section) if b.lang == "python"]
    assert len(blocks) == 1, section
    scope = {}
    exec(compile(blocks[0], "README.md (iMF example)", "exec"), scope)
    assert torch.isfinite(scope["loss"]).item()
    assert {"loss", "loss_u", "loss_v"} <= set(scope["stats"])
    assert scope["images"].shape == scope["latents"].shape
    assert scope["u"].shape == scope["v"].shape == scope["latents"].shape
    assert torch.isfinite(scope["images"]).all()
