"""The README's "API" example runs as written (a user copies it first)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no python example"
    scope = {}
    exec(compile(blocks[0], "README.md (API example)", "exec"), scope)
    assert torch.isfinite(scope["loss"]).item()
    assert scope["images"].shape == scope["latents"].shape
    assert scope["u"].shape == scope["dudt"].shape == scope["latents"].shape
