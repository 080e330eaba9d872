"""The Improved MeanFlow (iMF, arXiv 2512.02012) DiT: u_θ and the auxiliary v-head, with a plain forward
and a dual-stream forward_jvp (docs/DESIGN.md, "8 Improved MeanFlow (iMF): the model").

No adaLN: the conditions enter as prefix tokens (in-context conditioning). Each group is a learned
token set plus the broadcast embedding of its scalar, in this order:

    8 class tokens + E_y(y)   4 ω tokens + E_ω(1 − 1/ω)   2 t_min + E(t_min)   2 t_max + E(t_max)
    4 time tokens + E_h(h)    then the (H/p)² patch tokens

with h = t − r; t itself is not an input of the network (the official model conditions on h alone).
Blocks are pre-RMSNorm with per-channel gates (zero at init), attention with QK-RMSNorm and 1-D RoPE over
all tokens, and a SwiGLU MLP. The last ``head_depth`` blocks exist twice, as the u-head and the v-head
over a shared trunk; each head ends in RMSNorm + Linear on the patch tokens.

``forward`` runs the trunk and the requested heads (primal ops); ``forward_jvp`` runs the trunk and the
u-head with their tangents by the explicit rules (the ``*_jvp_ref`` of kernels/rmsnorm.py, qk_norm_rope.py
and swiglu.py) and the v-head on the trunk's primal output. Both go through the op tables of
``meanflow_fast.ops`` (``IMFOps``, ``IMFDualOps``): backend "torch" runs the references, "triton" the fused
kernels (RMSNorm, QK-norm + RoPE, SwiGLU, attention with its tangent; plain linears on cuBLAS, plain
attention on torch's SDPA). Both forwards run each gated residual fused with the RMSNorm that follows it
(``gated_residual_rmsnorm``: the block's second, the next block's first, the final layer's), so the blocks
are chained through ``IMFBlock``'s ``h`` / ``next_norm`` arguments, as the DiT's through
``forward_after_ln``.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.attention import SUPPORTED_HEAD_DIMS
from ..kernels.qk_norm_rope import rope_cos_sin
from ..checks import (as_batch_times, check_labels, check_latents, check_tangent, check_values, time_dtype,
                      value_checks_on)
from ..model import LabelEmbedder, TimestepEmbedder, preset_config
from ..ops import BACKENDS, IMFDualOps, IMFOps, get_imf_dual_ops, get_imf_primal_ops

Scalar = Union[float, torch.Tensor]
HEADS = ("both", "u", "v")


# =================================================================================================
#                                          Configs
# =================================================================================================
@dataclass(frozen=True)
class IMFConfig:
    input_size: int = 32        # latent side (ImageNet 256 → SD-VAE latents 32×32×4)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 768
    depth: int = 12             # trunk + one head, as the official counts it
    head_depth: int = 8         # blocks in each of the u- and v-head
    num_heads: int = 12
    mlp_ratio: float = 8 / 3    # SwiGLU hidden = int(hidden_size · mlp_ratio): 2048 at 768, 2730 at 1024
    num_classes: int = 1000     # the null (unconditional) label is num_classes
    num_class_tokens: int = 8
    num_omega_tokens: int = 4
    num_interval_tokens: int = 2  # each of t_min and t_max
    num_time_tokens: int = 4
    freq_dim: int = 256         # sinusoidal frequency embedding size of the scalar embedders
    max_period: float = 10000.0
    rope_theta: float = 10000.0
    eps: float = 1e-6           # every RMSNorm (blocks, QK-norm, final layers)
    v_head: bool = True         # False: the official inference layout, without the v-head's blocks

    @property
    def prefix_tokens(self) -> int:
        return self.num_class_tokens + self.num_omega_tokens + 2 * self.num_interval_tokens + self.num_time_tokens

    @property
    def num_tokens(self) -> int:
        return self.prefix_tokens + (self.input_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


# The paper's models (official imfDiT_{B,M,L,XL}_2; head dim 64) and small ones for tests and the demo.
IMF_PRESETS = {
    "B/2": dict(depth=12, hidden_size=768, num_heads=12),
    "M/2": dict(depth=24, hidden_size=768, num_heads=12),
    "L/2": dict(depth=32, hidden_size=1024, num_heads=16),
    "XL/2": dict(depth=48, hidden_size=1024, num_heads=16),
    "tiny": dict(input_size=8, in_channels=4, depth=3, head_depth=1, hidden_size=64, num_heads=2,
                 num_classes=10, freq_dim=32),
    "digits": dict(input_size=8, in_channels=1, depth=3, head_depth=1, hidden_size=96, num_heads=3,
                   num_classes=10, freq_dim=64),
}


def imf_dit(preset: str = "B/2", **overrides) -> "IMFDiT":
    """Build an iMF DiT from a preset name (``IMF_PRESETS``), with any IMFConfig field overridden."""
    return IMFDiT(preset_config(IMFConfig, IMF_PRESETS, preset, overrides))


# =================================================================================================
#                                    Op tables (backend switch)
# =================================================================================================
# IMFOps and IMFDualOps (the slots) and their tables live in meanflow_fast.ops, beside the DiT's.
_TORCH_PRIMAL = get_imf_primal_ops("torch")  # the modules' default when called on their own


def _check_imf_backend(backend: str, config: IMFConfig) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    head_dim = config.hidden_size // config.num_heads
    if backend == "triton" and head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"backend='triton' needs a head dim (hidden_size / num_heads) the attention kernels "
                         f"support, one of {SUPPORTED_HEAD_DIMS}; got {head_dim}. Use backend='torch'")


Rope = Tuple[torch.Tensor, torch.Tensor]  # cos, sin: (N, D_h/2)


# =================================================================================================
#                                       Core iMF blocks
# =================================================================================================
class RMSNorm(nn.Module):
    """x·(mean(x²) + eps)^(−1/2)·w over the last dim; w starts at one."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: IMFOps = _TORCH_PRIMAL) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def forward_jvp(self, x, x_dot, ops: IMFDualOps):
        return ops.rms_norm(x, self.weight, x_dot, self.eps)

    def after_residual(self, x, f, gate, ops: IMFOps):
        """(h, m): the gated residual h = x + f ⊙ g, then this RMSNorm of h, in one op."""
        return ops.gated_residual_rmsnorm(x, f, gate, self.weight, self.eps)

    def after_residual_jvp(self, x, f, gate, x_dot, f_dot, ops: IMFDualOps):
        """(h, ḣ, m, ṁ): the gated residual h = x + f ⊙ g, then this RMSNorm of h, in one op."""
        return ops.gated_residual_rmsnorm(x, f, gate, self.weight, x_dot, f_dot, self.eps)


class IMFAttention(nn.Module):
    """Multi-head self-attention: q, k, v, out projections without bias; per-head RMSNorm of q and k, then
    RoPE over all positions; softmax scale 1/√D_h."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = RMSNorm(self.head_dim, eps), RMSNorm(self.head_dim, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))  # (B, N, D) → (B, N, H, D_h)

    def forward(self, x: torch.Tensor, rope: Rope, ops: IMFOps = _TORCH_PRIMAL) -> torch.Tensor:
        q, k, v = (self._heads(ops.linear(x, p.weight, None)) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, *rope, self.q_norm.eps)
        o = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, N, D_h)
        return ops.linear(o.transpose(1, 2).flatten(2), self.out_proj.weight, None)

    def forward_jvp(self, x, x_dot, rope: Rope, ops: IMFDualOps):
        (q, q_dot), (k, k_dot), (v, v_dot) = (
            (self._heads(a), self._heads(a_dot)) for a, a_dot in
            (ops.linear(x, p.weight, None, x_dot) for p in (self.q_proj, self.k_proj, self.v_proj)))
        q, q_dot, k, k_dot = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, *rope, q_dot, k_dot,
                                              self.q_norm.eps)
        o, o_dot = ops.attention(*(a.transpose(1, 2) for a in (q, k, v, q_dot, k_dot, v_dot)))
        return ops.linear(o.transpose(1, 2).flatten(2), self.out_proj.weight, None, o_dot.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """(silu(x W1ᵀ) ⊙ x W3ᵀ) W2ᵀ, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, ops: IMFOps = _TORCH_PRIMAL) -> torch.Tensor:
        return ops.swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight)

    def forward_jvp(self, x, x_dot, ops: IMFDualOps):
        return ops.swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight, x_dot)


class IMFBlock(nn.Module):
    """x += g_a ⊙ Attn(RMSNorm(x));  x += g_m ⊙ SwiGLU(RMSNorm(x)); the (D,) gates start at zero."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attn = IMFAttention(dim, num_heads, eps)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.attn_gate, self.mlp_gate = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, rope: Rope, ops: IMFOps = _TORCH_PRIMAL, h: Optional[torch.Tensor] = None,
                next_norm: Optional[RMSNorm] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(x', h'): the block, each gated residual fused with the RMSNorm after it
        (``ops.gated_residual_rmsnorm``): norm2, then ``next_norm`` (the next block's norm1, or the final
        layer's norm) when given, h' = next_norm(x') (None without it). ``h`` = norm1(x) when the op before
        made it (chained); computed here when None (the block on its own)."""
        if h is None:
            h = self.norm1(x, ops)
        x, h = self.norm2.after_residual(x, self.attn(h, rope, ops), self.attn_gate, ops)
        f = self.mlp(h, ops)
        if next_norm is None:
            return ops.gated_residual(x, self.mlp_gate, f), None
        return next_norm.after_residual(x, f, self.mlp_gate, ops)

    def forward_jvp(self, x, x_dot, rope: Rope, ops: IMFDualOps, h=None, h_dot=None,
                    next_norm: Optional[RMSNorm] = None):
        """(x', ẋ', h', ḣ'): ``forward`` with the tangents; (h, ḣ) = norm1 of (x, ẋ) when chained, else
        computed here; (h', ḣ') = (None, None) without ``next_norm``."""
        if h is None:
            h, h_dot = self.norm1.forward_jvp(x, x_dot, ops)
        f, f_dot = self.attn.forward_jvp(h, h_dot, rope, ops)
        x, x_dot, h, h_dot = self.norm2.after_residual_jvp(x, f, self.attn_gate, x_dot, f_dot, ops)
        f, f_dot = self.mlp.forward_jvp(h, h_dot, ops)
        if next_norm is None:
            return (*ops.gated_residual(x, self.mlp_gate, f, x_dot, f_dot), None, None)
        return next_norm.after_residual_jvp(x, f, self.mlp_gate, x_dot, f_dot, ops)


class IMFFinalLayer(nn.Module):
    """RMSNorm, then a linear to p²·C per patch token (zero at init)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, ops: IMFOps = _TORCH_PRIMAL, h: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The output linear on h = RMSNorm(x); ``h`` given when the op before made it (chained: the last
        block's residual fused with this norm), computed here when None."""
        if h is None:
            h = self.norm(x, ops)
        return ops.linear(h, self.linear.weight, self.linear.bias)

    def forward_jvp(self, x, x_dot, ops: IMFDualOps, h=None, h_dot=None):
        """``forward`` with the tangents; (h, ḣ) = RMSNorm of (x, ẋ) when chained."""
        if h is None:
            h, h_dot = self.norm.forward_jvp(x, x_dot, ops)
        return ops.linear(h, self.linear.weight, self.linear.bias, h_dot)


# =================================================================================================
#                                        The iMF DiT
# =================================================================================================
class IMFDiT(nn.Module):
    """u_θ (and v_θ) of iMF: z (B, C, H, W); t, h = t − r, ω, t_min, t_max floats, 0-d or (B,) tensors with
    0 ≤ h ≤ t ≤ 1, ω ≥ 1, 0 ≤ t_min ≤ t_max ≤ 1; y (B,) int64 labels in [0, num_classes] (num_classes = the
    null label). Outputs are shaped like z.

    ``forward`` and ``forward_jvp`` check their inputs (``_check_inputs``, the checks MeanFlowDiT uses) and
    raise a ValueError naming the argument: shapes, dtypes and devices always; the values too, at one
    host sync per call on CUDA, except under torch.compile, during CUDA-graph capture and inside
    ``meanflow_fast.checks.skip_value_checks()``, which IMFLoss uses for the draws it checked itself."""

    def __init__(self, config: IMFConfig = IMFConfig(), backend: str = "torch"):
        super().__init__()
        _check_imf_config(config)
        _check_imf_backend(backend, config)
        self.config = config
        self.backend = backend
        c, D = config, config.hidden_size
        self.grid = c.input_size // c.patch_size
        self.x_embedder = nn.Conv2d(c.in_channels, D, kernel_size=c.patch_size, stride=c.patch_size)
        self.h_embedder, self.omega_embedder, self.t_min_embedder, self.t_max_embedder = (
            TimestepEmbedder(D, c.freq_dim, c.max_period) for _ in range(4))
        self.y_embedder = LabelEmbedder(c.num_classes, D)
        self.class_tokens = nn.Parameter(torch.empty(c.num_class_tokens, D))
        self.omega_tokens = nn.Parameter(torch.empty(c.num_omega_tokens, D))
        self.t_min_tokens = nn.Parameter(torch.empty(c.num_interval_tokens, D))
        self.t_max_tokens = nn.Parameter(torch.empty(c.num_interval_tokens, D))
        self.time_tokens = nn.Parameter(torch.empty(c.num_time_tokens, D))
        block = lambda: IMFBlock(D, c.num_heads, c.mlp_hidden, c.eps)  # noqa: E731
        self.trunk = nn.ModuleList(block() for _ in range(c.depth - c.head_depth))
        self.u_blocks = nn.ModuleList(block() for _ in range(c.head_depth))
        self.v_blocks = nn.ModuleList(block() for _ in range(c.head_depth if c.v_head else 0))
        # The v final layer exists even without the v-head's blocks, as in the official inference module,
        # so that its checkpoints map one to one; it is then unused.
        self.u_final = IMFFinalLayer(D, c.patch_size, c.in_channels, c.eps)
        self.v_final = IMFFinalLayer(D, c.patch_size, c.in_channels, c.eps)
        self.initialize_weights()

    # ----------------------------------------------------------------------------------- init
    def initialize_weights(self):
        """The official initialisation: block linears N(0, (0.32/√fan_in)²), embedder linears and the label
        table N(0, 1/fan_in) (fan_in = D for the table), prefix tokens N(0, 1/D), the patch conv
        Xavier-uniform, biases and gates zero, RMSNorm weights one, final linears zero."""
        D = self.config.hidden_size
        with torch.no_grad():
            w = self.x_embedder.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.x_embedder.bias)
            for emb in (self.h_embedder, self.omega_embedder, self.t_min_embedder, self.t_max_embedder):
                for lin in (emb.mlp[0], emb.mlp[2]):
                    nn.init.normal_(lin.weight, std=1 / math.sqrt(lin.in_features))
                    nn.init.zeros_(lin.bias)
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=1 / math.sqrt(D))
            for tokens in (self.class_tokens, self.omega_tokens, self.t_min_tokens, self.t_max_tokens,
                           self.time_tokens):
                nn.init.normal_(tokens, std=1 / math.sqrt(D))
            for m in (*self.trunk, *self.u_blocks, *self.v_blocks):
                for lin in m.modules():
                    if isinstance(lin, nn.Linear):
                        nn.init.normal_(lin.weight, std=0.32 / math.sqrt(lin.in_features))
                    elif isinstance(lin, RMSNorm):
                        nn.init.ones_(lin.weight)
                nn.init.zeros_(m.attn_gate)
                nn.init.zeros_(m.mlp_gate)
            for final in (self.u_final, self.v_final):
                nn.init.ones_(final.norm.weight)
                nn.init.zeros_(final.linear.weight)
                nn.init.zeros_(final.linear.bias)

    # ------------------------------------------------------------------------------- helpers
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _ops(self, dual: bool):
        _check_imf_backend(self.backend, self.config)
        return get_imf_dual_ops(self.backend) if dual else get_imf_primal_ops(self.backend)

    def patchify(self, z: torch.Tensor, bias: bool = True) -> torch.Tensor:
        x = F.conv2d(z, self.x_embedder.weight, self.x_embedder.bias if bias else None,
                     stride=self.config.patch_size)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) → (B, C, H, W); a token's p·p·C outputs are ordered (row, column, channel)."""
        p, C, h = self.config.patch_size, self.config.in_channels, self.grid
        x = x.reshape(x.shape[0], h, h, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, h * p)

    def rope(self, z: torch.Tensor) -> Rope:
        """cos and sin of the RoPE angles for the whole sequence, in z's time dtype (fp32; fp64 for fp64)."""
        c = self.config
        return rope_cos_sin(c.num_tokens, c.hidden_size // c.num_heads, c.rope_theta, time_dtype(z.dtype), z.device)

    def _check_inputs(self, z, t, h, omega, t_min, t_max, y, heads: str,
                      tangents: Optional[Tuple[torch.Tensor, Scalar, Scalar]] = None):
        """The one check of a call's inputs (``forward``; ``forward_jvp`` with ``tangents`` = (dz, dt, dh)),
        by the shared checks of ``meanflow_fast.checks``, as MeanFlowDiT's. Returns t, h, ω, t_min, t_max
        (and dh, else None) as (B,) tensors in z's time dtype (``as_batch_times``).

        Structural, always (no device sync): z (B, C, H, W) floating in the parameters' dtype
        (``check_latents``), y (B,) int32/int64 on z's device, each scalar a float, 0-d or (B,), ``heads``
        and the v-head it needs, dz shaped like z in its dtype and device. Values (``check_values``:
        0 ≤ h ≤ t ≤ 1, ω finite and ≥ 1, 0 ≤ t_min ≤ t_max ≤ 1, labels in [0, num_classes]): one host sync
        on CUDA; off under torch.compile, during CUDA-graph capture and inside ``skip_value_checks``
        (``value_checks_on``)."""
        c = self.config
        check_latents(z, (c.in_channels, c.input_size, c.input_size), self.x_embedder.weight.dtype)
        check_labels(y, z, c.num_classes)
        if heads not in HEADS:
            raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
        if heads != "u" and not c.v_head:
            raise ValueError(f"heads={heads!r} needs the v-head, and this model has none (v_head=False, the "
                             "official inference layout); use heads='u'")
        t, h, omega, t_min, t_max = (as_batch_times(name, value, z) for name, value in
                                     (("t", t), ("h", h), ("omega", omega), ("t_min", t_min), ("t_max", t_max)))
        dh = None
        if tangents is not None:
            dz, dt, dh = tangents
            check_tangent(dz, z)
            as_batch_times("dt", dt, z)
            dh = as_batch_times("dh", dh, z)
        if value_checks_on():
            check_values(y, c.num_classes, intervals=(("h", h, "t", t), ("t_min", t_min, "t_max", t_max)),
                         lower_bounds=(("omega", omega, 1.0, "the guidance scale; 1 = no guidance"),))
        return t, h, omega, t_min, t_max, dh

    def _prefix(self, h_emb, omega, t_min, t_max, y) -> torch.Tensor:
        """The (B, P, D) prefix tokens, given the time tokens' embedding ``h_emb`` (B, D)."""
        def group(tokens, emb):
            return tokens + emb[:, None]  # (B, n, D)
        return torch.cat([group(self.class_tokens, self.y_embedder(y)),
                          group(self.omega_tokens, self.omega_embedder(1 - 1 / omega)),
                          group(self.t_min_tokens, self.t_min_embedder(t_min)),
                          group(self.t_max_tokens, self.t_max_embedder(t_max)),
                          group(self.time_tokens, h_emb)], dim=1)

    @staticmethod
    def _first_norm(blocks: nn.ModuleList, next_norm: RMSNorm) -> RMSNorm:
        """The RMSNorm that the input of ``blocks`` goes through first: their first norm1, else ``next_norm``."""
        return blocks[0].norm1 if len(blocks) else next_norm

    @staticmethod
    def _blocks(x, h, blocks, next_norm: RMSNorm, rope: Rope, ops: IMFOps):
        """Chain ``blocks`` from (x, h), h = ``_first_norm(blocks, next_norm)`` of x, each block's last
        residual fused with the RMSNorm after it; returns (x', next_norm(x'))."""
        for block, norm in zip(blocks, [b.norm1 for b in blocks[1:]] + [next_norm]):
            x, h = block(x, rope, ops, h, norm)
        return x, h

    @staticmethod
    def _blocks_jvp(x, x_dot, h, h_dot, blocks, next_norm: RMSNorm, rope: Rope, ops: IMFDualOps):
        """``_blocks`` with the tangents: returns (x', ẋ', next_norm of (x', ẋ'))."""
        for block, norm in zip(blocks, [b.norm1 for b in blocks[1:]] + [next_norm]):
            x, x_dot, h, h_dot = block.forward_jvp(x, x_dot, rope, ops, h, h_dot, norm)
        return x, x_dot, h, h_dot

    def _head(self, x, h, blocks, final, rope, ops: IMFOps) -> torch.Tensor:
        """A head on the trunk's output x, h = its first RMSNorm of x (``_first_norm``)."""
        x, h = self._blocks(x, h, blocks, final.norm, rope, ops)
        P = self.config.prefix_tokens
        return self.unpatchify(final(x[:, P:], ops, h[:, P:]))

    # ------------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor, t: Scalar, h: Scalar, omega: Scalar, t_min: Scalar, t_max: Scalar,
                y: torch.Tensor, heads: str = "both"):
        """(u, v) for heads="both", u for "u", v for "v": runs the trunk and only the head(s) asked for."""
        _, h, omega, t_min, t_max, _ = self._check_inputs(z, t, h, omega, t_min, t_max, y, heads)
        ops = self._ops(dual=False)
        x = torch.cat([self._prefix(self.h_embedder(h), omega, t_min, t_max, y), self.patchify(z)], dim=1)
        rope = self.rope(z)
        u_norm = self._first_norm(self.u_blocks, self.u_final.norm)
        v_norm = self._first_norm(self.v_blocks, self.v_final.norm)
        # The trunk's last residual is fused with the first RMSNorm of the head that runs first (u's when
        # both run); the other head normalises the trunk's output with its own.
        first = u_norm if heads != "v" else v_norm
        x, x_norm = self._blocks(x, self._first_norm(self.trunk, first)(x, ops), self.trunk, first, rope, ops)
        u = v = None
        if heads != "v":
            u = self._head(x, x_norm, self.u_blocks, self.u_final, rope, ops)
        if heads != "u":
            v = self._head(x, x_norm if heads == "v" else v_norm(x, ops), self.v_blocks, self.v_final, rope, ops)
        return (u, v) if heads == "both" else (u if heads == "u" else v)

    def forward_jvp(self, z: torch.Tensor, t: Scalar, h: Scalar, omega: Scalar, t_min: Scalar, t_max: Scalar,
                    y: torch.Tensor, dz: torch.Tensor, dt: Scalar = 1.0,
                    dh: Scalar = 1.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, u̇, v): u and its derivative along the tangent (dz, dt, dh) by the explicit rules of
        docs/DESIGN.md, "8 Improved MeanFlow (iMF): the model", through the trunk and the u-head; v is the
        v-head on the trunk's primal output. ω, t_min and t_max have no tangent; t is not an input of the
        network, so dt does not change u̇ (it is checked like the other scalars, so a caller can state the
        whole direction; iMF's du/dt along (ż, ṙ, ṫ) = (v, 0, 1) is dz = v, dh = ṫ − ṙ = 1).

        ``u`` and ``v`` are differentiable; ``u̇`` carries no autograd graph.
        """
        _, h, omega, t_min, t_max, dh = self._check_inputs(z, t, h, omega, t_min, t_max, y, "both", (dz, dt, dh))
        ops, primal_ops = self._ops(dual=True), self._ops(dual=False)
        # Only the time tokens move with h; the patch embedding is linear (ẋ = conv(ż) without bias).
        h_emb, h_emb_dot = self.h_embedder.forward_jvp(h, dh)
        prefix = self._prefix(h_emb, omega, t_min, t_max, y)
        x = torch.cat([prefix, self.patchify(z)], dim=1)  # (B, N, D)
        with torch.no_grad():
            P, n_time = self.config.prefix_tokens, self.config.num_time_tokens
            prefix_dot = torch.zeros_like(prefix)
            prefix_dot[:, P - n_time:] = h_emb_dot[:, None]
            x_dot = torch.cat([prefix_dot, self.patchify(dz, bias=False)], dim=1)
        rope = self.rope(z)
        # The trunk ends fused with the u-head's first RMSNorm; the v-head (primal) normalises x itself.
        u_norm = self._first_norm(self.u_blocks, self.u_final.norm)
        x_norm, x_norm_dot = self._first_norm(self.trunk, u_norm).forward_jvp(x, x_dot, ops)
        x, x_dot, x_norm, x_norm_dot = self._blocks_jvp(x, x_dot, x_norm, x_norm_dot, self.trunk, u_norm, rope, ops)
        v_norm = self._first_norm(self.v_blocks, self.v_final.norm)
        v = self._head(x, v_norm(x, primal_ops), self.v_blocks, self.v_final, rope, primal_ops)
        x, x_dot, x_norm, x_norm_dot = self._blocks_jvp(x, x_dot, x_norm, x_norm_dot, self.u_blocks,
                                                        self.u_final.norm, rope, ops)
        out, out_dot = self.u_final.forward_jvp(x[:, P:], x_dot[:, P:], ops, x_norm[:, P:], x_norm_dot[:, P:])
        return self.unpatchify(out), self.unpatchify(out_dot), v


def _check_imf_config(c: IMFConfig) -> None:
    if c.input_size % c.patch_size:
        raise ValueError(f"input_size ({c.input_size}) must be divisible by patch_size ({c.patch_size})")
    if c.hidden_size % c.num_heads or (c.hidden_size // c.num_heads) % 2:
        raise ValueError(f"hidden_size ({c.hidden_size}) must split into num_heads ({c.num_heads}) heads of an "
                         "even size (RoPE rotates pairs of channels)")
    if not 0 <= c.head_depth <= c.depth:
        raise ValueError(f"head_depth must be in [0, depth={c.depth}], got {c.head_depth}")
    if c.freq_dim % 2:
        raise ValueError(f"freq_dim must be even (cos and sin halves), got {c.freq_dim}")
    counts = dict(num_class_tokens=c.num_class_tokens, num_omega_tokens=c.num_omega_tokens,
                  num_interval_tokens=c.num_interval_tokens, num_time_tokens=c.num_time_tokens)
    for name, n in counts.items():
        if n < 1:
            raise ValueError(f"{name} must be ≥ 1, got {n}")
