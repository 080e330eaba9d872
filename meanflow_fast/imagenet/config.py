"""The paper's ImageNet 256 training defaults, per preset, in one table (docs/DESIGN.md, "1 The
MeanFlow objective").

Every preset trains on SD-VAE latents (32×32×4, scaled by 0.18215) with global batch 256, Adam
β = (0.9, 0.95), a constant learning rate 1e−4, EMA 0.9999, 240 epochs, 10% class dropout, (t, r) from
logit-normal(−0.4, 1.0) with 25% of the batch r ≠ t, and the adaptive weight p = 1.0, c = 0.01 (the
official code's c; the paper's text says 1e−3). What differs per preset is the architecture and the
training-time guidance (ω, κ, interval). ``tiny`` is not the paper's: a test/debug model with the B/2
hyper-parameters.

``meanflow-train --preset X`` fills every flag it is not given from ``TRAIN_PRESETS[X]``;
``meanflow-train --method imf --preset X`` from ``IMF_TRAIN_PRESETS[X]``: the official iMF recipe
(its B/2 training config: global batch 1024, Adam β = (0.9, 0.95), lr 1e−4 constant after a linear
warm-up over 10 epochs, EMA 0.9999, fp32, 640 epochs; half the batch r ≠ t; ω = 8^U; interval ends
U(0, 0.5) and U(0.5, 1)), the same for every size; the architecture comes from ``imf.IMF_PRESETS``.
Sampling an iMF model takes its ω and interval from ``meanflow_fast.sampling.IMF_GUIDANCE`` (the official
evaluation settings of the released models).
"""
from typing import Dict

__all__ = ["TRAIN_PRESETS", "PAPER_PRESETS", "LATENT_SCALE", "DEFAULT_VAE", "IMF_TRAIN_PRESETS"]

LATENT_SCALE = 0.18215                       # SD-VAE latent scale (Rombach et al. 2022)
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"    # the VAE DiT trained with; a local directory works offline

_COMMON = dict(
    global_batch_size=256, lr=1e-4, adam_betas=(0.9, 0.95), weight_decay=0.0, ema_decay=0.9999, epochs=240,
    class_dropout=0.1, time_mu=-0.4, time_sigma=1.0, ratio_r_neq_t=0.25, adaptive_p=1.0, adaptive_c=0.01,
)

#   preset: architecture (depth, width, heads) + guidance (ω, κ, [t_lo, t_hi]) + the common defaults
TRAIN_PRESETS: Dict[str, dict] = {
    "B/2":  dict(depth=12, hidden_size=768,  num_heads=12, omega=1.0, kappa=0.5,  guidance_interval=(0.0, 1.0),  **_COMMON),
    "M/2":  dict(depth=16, hidden_size=1024, num_heads=16, omega=1.0, kappa=0.5,  guidance_interval=(0.0, 1.0),  **_COMMON),
    "L/2":  dict(depth=24, hidden_size=1024, num_heads=16, omega=0.2, kappa=0.92, guidance_interval=(0.0, 0.8),  **_COMMON),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, omega=0.2, kappa=0.92, guidance_interval=(0.0, 0.75), **_COMMON),
    "tiny": dict(depth=2,  hidden_size=64,   num_heads=2,  omega=1.0, kappa=0.5,  guidance_interval=(0.0, 1.0),  **_COMMON),
}

PAPER_PRESETS = ("B/2", "M/2", "L/2", "XL/2")

# ------------------------------------------------------------------------------------------- iMF
_IMF_COMMON = dict(
    global_batch_size=1024, lr=1e-4, warmup_epochs=10.0, adam_betas=(0.9, 0.95), weight_decay=0.0,
    ema_decay=0.9999, epochs=640, precision="fp32", class_dropout=0.1, time_mu=-0.4, time_sigma=1.0,
    ratio_r_neq_t=0.5, omega_max=8.0, adaptive_p=1.0, adaptive_c=0.01,
)
# The sample grid during training uses the official training config's ω 7.5 on [0.4, 0.65].
IMF_TRAIN_PRESETS: Dict[str, dict] = {
    name: dict(sample_omega=7.5, sample_t_min=0.4, sample_t_max=0.65, **_IMF_COMMON)
    for name in ("B/2", "M/2", "L/2", "XL/2", "tiny")
}
