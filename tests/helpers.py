"""Helpers shared by the tests (import as ``from tests.helpers import ...``)."""
import os
import re
import subprocess
import sys
from typing import Callable, List, NamedTuple, Tuple

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def spy_central_difference(monkeypatch, module) -> List[dict]:
    """Record every ``central_difference_jvp`` call of ``module`` (a loss module): its arguments and its
    result, one dict per call, in the list returned."""
    seen = []
    orig = module.central_difference_jvp

    def spy(fn, primals, tangents, eps=None, **kw):
        out = orig(fn, primals, tangents, eps, **kw)
        seen.append(dict(primals=primals, tangents=tangents, eps=eps, out=out, **kw))
        return out
    monkeypatch.setattr(module, "central_difference_jvp", spy)
    return seen


def fd_error_bound(u_along: Callable[[torch.Tensor, torch.dtype], torch.Tensor], t: torch.Tensor,
                   r: torch.Tensor, eps: float, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(exact du/dt, its error bound per element) for the losses' jvp="fd" (``central_difference_jvp`` with
    step ``eps`` at working precision ``dtype``): the exact derivative from torch.func.jvp in fp64; the bound
    meanflow_fast/jvp.py states, ε²/6·M₃ + δ/ε on central rows (r < t), ε²/3·M₃ + 4δ/ε on the r = t
    rows (forward nodes ε, 2ε: t − ε would pass below r). M₃: the largest |d³u/ds³| at the nodes, from a
    forward second difference (step η = 1e-3: every point stays valid) of the exact first derivative
    (torch.func.jvp, fp64; nested forward AD has no rule for silu's backward). δ: the row's largest error of
    u evaluated in float32 at a node against fp64, times u_dtype/u_fp32 for ``dtype`` (the same operations
    round at that much smaller a unit; fp64 has no wider type to measure against).

    ``u_along(s, precision)``: u at the point moved by ``s`` (per row) along the loss's direction, time
    t + s, with the point, the direction and ``s`` formed in ``precision`` (torch.float64 or
    torch.float32) from the working-precision ones, the network in that precision too."""
    B = t.shape[0]

    def d1(fn):
        return lambda s: torch.func.jvp(fn, (s,), (torch.ones_like(s),))[1]
    u64 = lambda s: u_along(s, torch.float64)  # noqa: E731

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        exact = d1(u64)(torch.zeros(B, dtype=torch.float64))
        central = (t - r) > 0
        eta = 1e-3
        assert bool(((t - r)[central] >= eps).all() & (1 - t >= 2 * eps + 2 * eta).all())  # the case's premise
        nodes = [torch.where(central, s_c, s_f).double() for s_c, s_f in ((-eps, 0.0), (0.0, eps), (eps, 2 * eps))]
        g1 = d1(u64)
        M3 = torch.stack([((g1(s + 2 * eta) - 2 * g1(s + eta) + g1(s)) / eta ** 2).abs() for s in nodes]).amax(0)
        deltas = [(u_along(s, torch.float32).double() - u64(s)).abs().flatten(1).amax(1) for s in nodes]
        delta = torch.stack(deltas).amax(0) * (torch.finfo(dtype).eps / torch.finfo(torch.float32).eps)
    rows = lambda a: a.view((-1,) + (1,) * (exact.dim() - 1))  # noqa: E731
    delta = rows(delta)
    bound = torch.where(rows(central), eps ** 2 / 6 * M3 + delta / eps, eps ** 2 / 3 * M3 + 4 * delta / eps)
    return exact, bound


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


def run_killed_past(limit: int, setup: str, write: str, *args: str) -> subprocess.CompletedProcess:
    """Run the Python source ``setup`` and then ``write`` in a child process (``sys.argv[1:]`` = ``args``)
    which the kernel kills with SIGXFSZ the moment ``write`` takes a file past ``limit`` bytes: a kill at
    a known point in the middle of a write, whoever writes (Python ignores SIGXFSZ, so the child restores
    the default action; the limit starts after ``setup``, so that its imports write what they like)."""
    script = "\n".join([setup, "import resource, signal", "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)",
                        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))", write])
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
