"""Helpers shared by the tests (import as ``from tests.helpers import ...``)."""
import re
from typing import List, NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_within_torch(what: str, got: torch.Tensor, torch_own: torch.Tensor, exact: torch.Tensor,
                        factor: float = 2.0, atol: float = 0.0) -> None:
    """The accuracy rule of the kernel tests: ``got``'s relative error against ``exact`` at most ``factor``
    times the error of torch's own computation at the same precision (``torch_own``), plus ``atol``."""
    err, tol = rel_err(got, exact), factor * rel_err(torch_own, exact) + atol
    assert err <= tol, f"{what}: rel err {err:.3g} > tol {tol:.3g}"


def randomize_(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std²): the adaLN-Zero init would hide tangent bugs."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


class OpLog(TorchDispatchMode):
    """Records the top-level ops run inside the ``with`` block by name (``aten.zeros``,
    ``meanflow_fast.attn_bwd_qkv``; a custom op counts as one op, its inside is not seen): ``ops`` all of
    them in order, ``big`` the set of those that made an activation-sized (≥ 3-D) tensor and
    ``big_calls`` how many times each of those ran."""

    def __init__(self):
        super().__init__()
        self.ops, self.big, self.big_calls = [], set(), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.ops.append(name)
        outs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.dim() >= 3 for o in outs):
            self.big.add(name)
            self.big_calls[name] = self.big_calls.get(name, 0) + 1
        return out


class FencedBlock(NamedTuple):
    lang: str    # the fence's info string: "python", "bash", "" for none
    code: str    # the lines between the fences, each with its newline
    before: str  # the text between the previous block (or the start) and this block's opening fence


def fenced_blocks(markdown: str) -> List[FencedBlock]:
    """The fenced code blocks of a Markdown text in order: a line ```lang opens one, a line ``` closes it."""
    blocks, end = [], 0
    for m in re.finditer(r"^```(\w*)\n(.*?)^```[ \t]*$", markdown, re.M | re.S):
        blocks.append(FencedBlock(m[1], m[2], markdown[end:m.start()]))
        end = m.end()
    return blocks
