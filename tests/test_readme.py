"""The README's "API" example runs as written (a user copies it first)."""
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
