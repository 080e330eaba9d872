"""The MeanFlow DiT: u_θ(z, r, t | y), with a plain forward and a dual-stream forward_jvp.

Architecture as DiT (Peebles & Xie, 2023) with adaLN-Zero blocks; MeanFlow conditions on (t, t − r)
with two sinusoidal time embedders summed with the label embedding (docs/DESIGN.md, "2 The dual-stream
model"):

    c = E_t(t) + E_h(t − r) + E_y(y)

``forward`` runs the primal stream alone, ``forward_jvp`` the primal and the tangent stream (tangents dz,
dr = 0, dt = 1) op by op with the explicit rules of docs/DESIGN.md, "3 JVP rules"; both through the
backend switch of ``meanflow_fast.ops`` (``PrimalOps`` / ``DualOps``). With ``backend="triton"`` the plain forward runs
the fused LayerNorm-modulate, gated-residual and fc1 + GELU kernels, with the plain linears and fc2 on
cuBLAS and attention on torch's SDPA; the conditioning (embedders, adaLN) stays in torch either way.
Both forwards run each gated residual fused with the LayerNorm-modulate that follows it
(``gated_residual_ln``: the block's second, the next block's first, the final layer's), so the blocks
are chained through ``DiTBlock.forward_after_ln`` / ``DiTBlock.forward_jvp_after_ln``;
``DiTBlock.forward`` / ``DiTBlock.forward_jvp`` are one block on its own.
"""
import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The input checks, shared with IMFDiT and the losses. check_values, skip_value_checks and time_dtype are
# also importable from here, where the samplers take them.
from .checks import (as_batch_times, check_labels, check_latents, check_tangent, check_values,
                     skip_value_checks, time_dtype, value_checks_on)
from .kernels import linear_jvp_ref, split_qkv
from .ops import BACKENDS, DualOps, PrimalOps, get_dual_ops, get_primal_ops

Times = Union[float, torch.Tensor]
TORCH_OPS = get_primal_ops("torch")  # the blocks' default when called on their own


# =================================================================================================
#                                          Configs
# =================================================================================================
@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32      # latent side (ImageNet 256 → SD-VAE latents 32×32×4)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000   # the null (unconditional) label is num_classes
    freq_dim: int = 256       # sinusoidal frequency embedding size
    max_period: float = 10000.0


# The paper's presets (docs/DESIGN.md, "1 The MeanFlow objective") and small ones for tests and the demo.
PRESETS = {
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16),
    "M/2": dict(depth=16, hidden_size=1024, num_heads=16),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12),
    "S/2": dict(depth=12, hidden_size=384, num_heads=6),
    "tiny": dict(input_size=8, in_channels=4, depth=2, hidden_size=64, num_heads=2,
                 num_classes=10, freq_dim=32),
    "digits": dict(input_size=8, in_channels=1, patch_size=2, depth=3, hidden_size=96,
                   num_heads=3, num_classes=10, freq_dim=64),
}


def preset_config(config_class: type, presets: dict, preset: str, overrides: dict):
    """``config_class()`` with ``presets[preset]`` and then ``overrides`` (field → value) applied; the
    builder of every network (``meanflow_dit``, ``imf_dit``) goes through it."""
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    fields = set(config_class.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} field(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    return replace(config_class(), **{**presets[preset], **overrides})


def meanflow_dit(preset: str = "B/2", **overrides) -> "MeanFlowDiT":
    """Build a MeanFlow DiT from a preset name (``PRESETS``), with any DiTConfig field overridden."""
    return MeanFlowDiT(preset_config(DiTConfig, PRESETS, preset, overrides))


# =================================================================================================
#                                   Dual-stream helpers (small ops)
# =================================================================================================
def silu_jvp(a: torch.Tensor, a_dot: torch.Tensor):
    """SiLU and its tangent σ(a)·(1 + a·(1 − σ(a)))·ȧ."""
    y = F.silu(a)
    with torch.no_grad():
        s = torch.sigmoid(a)
        y_dot = s * (1 + a * (1 - s)) * a_dot
    return y, y_dot


# =================================================================================================
#                                Embedding layers for timesteps and labels
# =================================================================================================
class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of a raw time s ∈ [0, 1] followed by Linear → SiLU → Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.freq_dim, self.max_period = freq_dim, max_period

    def _args(self, s: torch.Tensor):
        """ω and ω·s, (F/2,) and (B, F/2), in fp32 (fp64 for fp64 s) whatever the model's dtype."""
        dt = time_dtype(s.dtype)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=dt, device=s.device) / half)
        return freqs, s.to(dt)[:, None] * freqs[None]

    def sinusoid(self, s: torch.Tensor) -> torch.Tensor:
        args = self._args(s)[1]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, F)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(s).to(self.mlp[0].weight.dtype))

    def forward_jvp(self, s: torch.Tensor, s_dot: torch.Tensor):
        """φ(s) = [cos ωs, sin ωs] has φ' = [−ω sin ωs, ω cos ωs]; then the MLP's rules."""
        freqs, args = self._args(s)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        emb_dot = torch.cat([-torch.sin(args), torch.cos(args)], dim=-1) * torch.cat([freqs, freqs])
        emb_dot = emb_dot * s_dot[:, None].to(emb_dot.dtype)
        dt = self.mlp[0].weight.dtype
        h, h_dot = linear_jvp_ref(emb.to(dt), self.mlp[0].weight, self.mlp[0].bias, emb_dot.to(dt))
        h, h_dot = silu_jvp(h, h_dot)
        return linear_jvp_ref(h, self.mlp[2].weight, self.mlp[2].bias, h_dot)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, index ``num_classes``, for the null (unconditional) label."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


# =================================================================================================
#                                       Core DiT blocks
# =================================================================================================
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def _merge(o: torch.Tensor) -> torch.Tensor:
        B, H, N, Dh = o.shape
        return o.transpose(1, 2).reshape(B, N, H * Dh)  # (B, N, D)

    def forward(self, x: torch.Tensor, ops: PrimalOps = TORCH_OPS) -> torch.Tensor:
        q, k, v = split_qkv(ops.linear(x, self.qkv.weight, self.qkv.bias), self.num_heads)  # (B, H, N, Dh) views
        return ops.linear(self._merge(ops.attention(q, k, v)), self.proj.weight, self.proj.bias)

    def forward_jvp(self, x, x_dot, ops: DualOps):
        qkv, qkv_dot = ops.linear(x, self.qkv.weight, self.qkv.bias, x_dot)
        # the packed projection goes in whole: the fused backend writes its gradient in one buffer
        o, o_dot = ops.attention(qkv, qkv_dot, self.num_heads, None)
        return ops.linear(self._merge(o), self.proj.weight, self.proj.bias, self._merge(o_dot))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, ops: PrimalOps = TORCH_OPS) -> torch.Tensor:
        return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)

    def forward_jvp(self, x, x_dot, ops: DualOps):
        return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, x_dot)


@dataclass
class LnModulation:
    """One LayerNorm-modulate m = LN(x)·(1 + scale) + shift: its (B, D) shift and scale, their tangents
    (None in the plain forward), its eps."""
    shift: torch.Tensor
    scale: torch.Tensor
    shift_dot: Optional[torch.Tensor] = None
    scale_dot: Optional[torch.Tensor] = None
    eps: float = 1e-6

    def apply(self, ops: PrimalOps, x):
        """m of the plain forward."""
        return ops.ln_modulate(x, self.shift, self.scale, self.eps)

    def after_residual(self, ops: PrimalOps, x, gate, f):
        """(y, m): the gated residual y = x + g ⊙ f, then this LayerNorm-modulate of y, in one op."""
        return ops.gated_residual_ln(x, gate, f, self.shift, self.scale, self.eps)

    def jvp(self, ops: DualOps, x, x_dot):
        """(m, ṁ) of m = LN(x)·(1 + scale) + shift."""
        return ops.ln_modulate(x, self.shift, self.scale, x_dot, self.shift_dot, self.scale_dot, self.eps)

    def after_residual_jvp(self, ops: DualOps, x, gate, f, x_dot, gate_dot, f_dot):
        """(y, ẏ, m, ṁ): the gated residual y = x + g ⊙ f, then this LayerNorm-modulate of y, in one op."""
        return ops.gated_residual_ln(x, gate, f, self.shift, self.scale, x_dot, gate_dot, f_dot, self.shift_dot,
                                     self.scale_dot, self.eps)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g1·Attn(LN(x)·(1+s1)+b1);  x += g2·MLP(LN(x)·(1+s2)+b2)."""

    eps = 1e-6

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ops: PrimalOps = TORCH_OPS) -> torch.Tensor:
        """The block on its own: x → x'."""
        mod = self.modulation(F.silu(c))
        return self.forward_after_ln(x, self.first_ln(mod).apply(ops, x), mod, ops)[0]

    def modulation(self, a: torch.Tensor):
        """The six (B, D) adaLN chunks (sh1, sc1, g1, sh2, sc2, g2) from a = SiLU(c), the SiLU of
        ``adaLN_modulation`` taken out: the model computes it once for all blocks."""
        return self.adaLN_modulation[1](a).chunk(6, dim=1)

    def first_ln(self, mod) -> LnModulation:
        """The block's first LayerNorm-modulate in the plain forward, from its chunks (``modulation``)."""
        return LnModulation(mod[0], mod[1], eps=self.eps)

    def forward_after_ln(self, x, h, mod, ops: PrimalOps, next_ln: Optional[LnModulation] = None):
        """The plain forward's ``forward_jvp_after_ln``: the block from h = LN(x)·(1 + sc1) + sh1 on, each
        gated residual fused with the LayerNorm-modulate after it (``ops.gated_residual_ln``). Returns
        (x', h'), h' = next_ln applied to x' (None without ``next_ln``)."""
        _, _, g1, sh2, sc2, g2 = mod
        x, h = ops.gated_residual_ln(x, g1, self.attn(h, ops), sh2, sc2, self.eps)
        f = self.mlp(h, ops)
        if next_ln is None:
            return ops.gated_residual(x, g2, f), None
        return next_ln.after_residual(ops, x, g2, f)

    def modulation_jvp(self, a, a_dot):
        """The six (B, D) adaLN chunks (sh1, sc1, g1, sh2, sc2, g2) and their tangents, from
        (a, ȧ) = (SiLU(c), its tangent): ``silu_jvp``, which the model computes once for all blocks."""
        mod, mod_dot = _adaln_jvp(self.adaLN_modulation[1], a, a_dot)
        return mod.chunk(6, dim=1), mod_dot.chunk(6, dim=1)

    def ln(self, mod, which: int) -> LnModulation:
        """The block's first (``which`` = 1) or second (2) LayerNorm-modulate, from its adaLN chunks."""
        (sh1, sc1, _, sh2, sc2, _), (dsh1, dsc1, _, dsh2, dsc2, _) = mod
        return (LnModulation(sh1, sc1, dsh1, dsc1, self.eps) if which == 1 else
                LnModulation(sh2, sc2, dsh2, dsc2, self.eps))

    def forward_jvp(self, x, x_dot, c, c_dot, ops: DualOps):
        """The block on its own: (x, ẋ) → (x', ẋ')."""
        mod = self.modulation_jvp(*silu_jvp(c, c_dot))
        h, h_dot = self.ln(mod, 1).jvp(ops, x, x_dot)
        return self.forward_jvp_after_ln(x, x_dot, h, h_dot, mod, ops)[:2]

    def forward_jvp_after_ln(self, x, x_dot, h, h_dot, mod, ops: DualOps, next_ln: Optional[LnModulation] = None):
        """The block from its first LayerNorm-modulate's output h = LN(x)·(1 + sc1) + sh1 on, with each
        gated residual fused with the LayerNorm-modulate that follows it (``ops.gated_residual_ln``): the
        block's second one, and ``next_ln`` (the next block's first, or the final layer's) when given.
        Returns (x', ẋ', h', ḣ'), h' = next_ln applied to x' (None, None without ``next_ln``)."""
        (_, _, g1, _, _, g2), (_, _, dg1, _, _, dg2) = mod
        f, f_dot = self.attn.forward_jvp(h, h_dot, ops)
        x, x_dot, h, h_dot = self.ln(mod, 2).after_residual_jvp(ops, x, g1, f, x_dot, dg1, f_dot)
        f, f_dot = self.mlp.forward_jvp(h, h_dot, ops)
        if next_ln is None:
            return (*ops.gated_residual(x, g2, f, x_dot, dg2, f_dot), None, None)
        return next_ln.after_residual_jvp(ops, x, g2, f, x_dot, dg2, f_dot)


def _adaln_jvp(linear: nn.Linear, a: torch.Tensor, a_dot: torch.Tensor):
    """An adaLN linear on (a, ȧ) = (SiLU(c), its tangent) with its tangent; (B, D) → (B, k·D). Small, so
    always in torch."""
    return linear_jvp_ref(a, linear.weight, linear.bias, a_dot)


class FinalLayer(nn.Module):
    eps = 1e-6

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ops: PrimalOps = TORCH_OPS) -> torch.Tensor:
        return self.head(self.ln(F.silu(c)).apply(ops, x), ops)

    def ln(self, a) -> LnModulation:
        """The final LayerNorm-modulate's shift and scale (plain forward), from a = SiLU(c)."""
        shift, scale = self.adaLN_modulation[1](a).chunk(2, dim=1)
        return LnModulation(shift, scale, eps=self.eps)

    def head(self, h, ops: PrimalOps):
        """The output linear on the LayerNorm-modulated h (plain forward)."""
        return ops.linear(h, self.linear.weight, self.linear.bias)

    def ln_jvp(self, a, a_dot) -> LnModulation:
        """The final LayerNorm-modulate's shift and scale and their tangents, from (a, ȧ) = (SiLU(c), its
        tangent)."""
        mod, mod_dot = _adaln_jvp(self.adaLN_modulation[1], a, a_dot)
        (shift, scale), (dshift, dscale) = mod.chunk(2, dim=1), mod_dot.chunk(2, dim=1)
        return LnModulation(shift, scale, dshift, dscale, self.eps)

    def forward_jvp(self, x, x_dot, c, c_dot, ops: DualOps):
        return self.head_jvp(*self.ln_jvp(*silu_jvp(c, c_dot)).jvp(ops, x, x_dot), ops)

    def head_jvp(self, h, h_dot, ops: DualOps):
        """The output linear on the LayerNorm-modulated h."""
        return ops.linear(h, self.linear.weight, self.linear.bias, h_dot)


# =================================================================================================
#                                        The MeanFlow DiT
# =================================================================================================
class MeanFlowDiT(nn.Module):
    """u_θ(z, r, t | y): z (B, C, H, W) in the parameters' dtype; r, t floats or (B,) with 0 ≤ r ≤ t ≤ 1;
    y (B,) int64 labels in [0, num_classes] (num_classes = the null label). Returns the average
    velocity, shaped like z.

    ``forward`` and ``forward_jvp`` check their inputs (``_check_inputs``) and raise a ValueError naming
    the argument: shapes, dtypes and devices always; the values (times and labels in range) too, at one
    host sync per call on CUDA, except under torch.compile, during CUDA-graph capture and inside
    ``skip_value_checks()``, which MeanFlowLoss, ``sample`` and GraphSampler use for the draws they checked
    themselves."""

    def __init__(self, config: DiTConfig = DiTConfig(), backend: str = "torch"):
        super().__init__()
        if config.input_size % config.patch_size:
            raise ValueError(f"input_size ({config.input_size}) must be divisible by patch_size ({config.patch_size})")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = config
        self.backend = backend
        D, p = config.hidden_size, config.patch_size
        self.grid = config.input_size // p
        self.x_embedder = nn.Conv2d(config.in_channels, D, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(D, self.grid), persistent=False)  # (1, N, D)
        self.t_embedder = TimestepEmbedder(D, config.freq_dim, config.max_period)
        self.h_embedder = TimestepEmbedder(D, config.freq_dim, config.max_period)  # embeds t − r
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.blocks = nn.ModuleList(DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, p, config.in_channels)
        self.initialize_weights()

    # ----------------------------------------------------------------------------------- init
    def initialize_weights(self):
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.t_embedder, self.h_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------------------- helpers
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _check_inputs(self, z: torch.Tensor, r: Times, t: Times, y: torch.Tensor,
                      tangents: Optional[Tuple[torch.Tensor, Times, Times]] = None):
        """The one check of a call's inputs (``forward``; ``forward_jvp`` with ``tangents`` = (dz, dr, dt)),
        by the shared checks of ``meanflow_fast.checks``. Returns r, t (and dr, dt, else None) as (B,)
        tensors (``as_batch_times``).

        Structural, always (no device sync): z (B, C, H, W) floating in the parameters' dtype
        (``check_latents``), y (B,) int32/int64 on z's device, the times a float, 0-d or (B,), dz shaped
        like z in its dtype and device. Values (``check_values``: 0 ≤ r ≤ t ≤ 1, labels in
        [0, num_classes]): one host sync on CUDA; off under torch.compile, during CUDA-graph capture and
        inside ``skip_value_checks`` (``value_checks_on``)."""
        c = self.config
        check_latents(z, (c.in_channels, c.input_size, c.input_size), self.x_embedder.weight.dtype)
        check_labels(y, z, c.num_classes)
        r_b, t_b = as_batch_times("r", r, z), as_batch_times("t", t, z)
        dr_b = dt_b = None
        if tangents is not None:
            dz, dr, dt = tangents
            check_tangent(dz, z)
            dr_b, dt_b = as_batch_times("dr", dr, z), as_batch_times("dt", dt, z)
        if value_checks_on():
            check_values(y, c.num_classes, r_b, t_b)
        return r_b, t_b, dr_b, dt_b

    def patchify(self, z: torch.Tensor, bias: bool = True) -> torch.Tensor:
        x = F.conv2d(z, self.x_embedder.weight, self.x_embedder.bias if bias else None,
                     stride=self.config.patch_size)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) → (B, C, H, W)."""
        p, C, h = self.config.patch_size, self.config.in_channels, self.grid
        x = x.reshape(x.shape[0], h, h, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, h * p)

    def condition(self, r: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t) + self.h_embedder(t - r) + self.y_embedder(y)  # (B, D)

    # ------------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor, r: Times, t: Times, y: torch.Tensor,
                backend: Optional[str] = None) -> torch.Tensor:
        """u_θ(z, r, t | y), the primal stream alone. ``backend`` (default: ``self.backend``) is one of
        ``meanflow_fast.ops.BACKENDS``: "torch" runs torch ops, "triton" the fused primal-only kernels
        (``meanflow_fast.ops.PrimalOps``)."""
        r, t, _, _ = self._check_inputs(z, r, t, y)
        ops = get_primal_ops(backend or self.backend)
        x = self.patchify(z) + self.pos_embed.to(z.dtype)  # (B, N, D)
        c = self.condition(r, t, y)                         # (B, D)
        # As in forward_jvp: every gated residual fused with the LayerNorm-modulate after it, and every
        # adaLN fed by one SiLU(c).
        a = F.silu(c)
        mods = [block.modulation(a) for block in self.blocks]
        lns = [block.first_ln(mod) for block, mod in zip(self.blocks, mods)]
        lns.append(self.final_layer.ln(a))
        h = lns[0].apply(ops, x)
        for block, mod, next_ln in zip(self.blocks, mods, lns[1:]):
            x, h = block.forward_after_ln(x, h, mod, ops, next_ln)
        return self.unpatchify(self.final_layer.head(h, ops))  # (B, C, H, W)

    def forward_jvp(self, z: torch.Tensor, r: Times, t: Times, y: torch.Tensor, dz: torch.Tensor,
                    backend: Optional[str] = None, *, dr: Times = 0.0,
                    dt: Times = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """(u, u̇): u(z, r, t | y) and its derivative along the tangent (dz, dr, dt), by the explicit rules
        of docs/DESIGN.md, "3 JVP rules". The default direction (dz, 0, 1) gives MeanFlow's du/dt; ``dr`` and ``dt`` (a
        float, a 0-d or a (B,) tensor, like r and t) pick another one (e.g. dr = 1, dt = 0 for ∂u/∂r
        along dz, or a per-sample mix), for objectives that differentiate along other directions.

        ``u`` is differentiable; ``u̇`` carries no autograd graph. ``backend`` (default:
        ``self.backend``) is one of ``meanflow_fast.ops.BACKENDS``.
        """
        r, t, dr, dt = self._check_inputs(z, r, t, y, (dz, dr, dt))
        ops = get_dual_ops(backend or self.backend)
        # Conditioning: ċ = E_t'(t)·ṫ + E_h'(t − r)·(ṫ − ṙ); the label embedding is constant.
        ct, ct_dot = self.t_embedder.forward_jvp(t, dt)
        ch, ch_dot = self.h_embedder.forward_jvp(t - r, dt - dr)
        c, c_dot = ct + ch + self.y_embedder(y), ct_dot + ch_dot
        # Patch embedding is linear: ẋ = conv(ż) without bias; the fixed pos-embedding adds nothing.
        x = self.patchify(z) + self.pos_embed.to(z.dtype)
        with torch.no_grad():
            x_dot = self.patchify(dz.to(z.dtype), bias=False)
        # Each gated residual is fused with the LayerNorm-modulate after it (``ops.gated_residual_ln``), so
        # every block's adaLN chunks are made up front and each block gets the next one's; SiLU(c) and its
        # tangent are computed once for all adaLN modulations.
        a, a_dot = silu_jvp(c, c_dot)
        mods = [block.modulation_jvp(a, a_dot) for block in self.blocks]
        lns = [block.ln(mod, 1) for block, mod in zip(self.blocks, mods)] + [self.final_layer.ln_jvp(a, a_dot)]
        h, h_dot = lns[0].jvp(ops, x, x_dot)
        for block, mod, next_ln in zip(self.blocks, mods, lns[1:]):
            x, x_dot, h, h_dot = block.forward_jvp_after_ln(x, x_dot, h, h_dot, mod, ops, next_ln)
        out, out_dot = self.final_layer.head_jvp(h, h_dot, ops)
        return self.unpatchify(out), self.unpatchify(out_dot)


# =================================================================================================
#                      Fixed 2D sin-cos positional embedding (as in MAE / DiT)
# =================================================================================================
def get_2d_sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """(1, grid², dim): half the channels encode the row, half the column, each as [sin, cos]."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2D sin-cos embedding, got {dim}")

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)

