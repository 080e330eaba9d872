"""Latent conventions: how a VAE's raw latent maps to the space a model is trained and sampled in.

    "sd-0.18215"   z = raw · 0.18215                 (DiT, MeanFlow; decode raw = z / 0.18215)
    "imf-channel"  z = (raw − mean_c) / std_c        (iMF; per channel c, decode raw = z · std_c + mean_c)

with iMF's constants for the SD-VAE's 4 channels (``IMF_CHANNEL_MEAN``, ``IMF_CHANNEL_STD``). Both are
affine per channel, so a posterior N(m, s²) of the raw latent is N(norm(m), (s·a)²) in the model's space
(a = 0.18215 or 1/std_c): extraction stores the normalised mean and std, and a fresh draw from them is a
fresh posterior draw, normalised. Extraction records the convention in its shards and dataset.json,
meanflow-train in its checkpoints and model files (metadata ``latent_norm``), and meanflow-sample decodes
with the model's.
"""
from typing import Sequence

import torch

__all__ = ["LATENT_NORMS", "DEFAULT_LATENT_NORM", "IMF_CHANNEL_MEAN", "IMF_CHANNEL_STD", "check_latent_norm",
           "normalize", "normalize_std", "denormalize"]

SD_SCALE = 0.18215
IMF_CHANNEL_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
IMF_CHANNEL_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)
LATENT_NORMS = ("sd-0.18215", "imf-channel")
# What every shard, checkpoint and model file written before the convention was recorded used.
DEFAULT_LATENT_NORM = "sd-0.18215"


def check_latent_norm(norm: str, what: str = "latent_norm") -> str:
    if norm not in LATENT_NORMS:
        raise ValueError(f"{what} must be one of {LATENT_NORMS}, got {norm!r}")
    return norm


def _channel(values: Sequence[float], z: torch.Tensor) -> torch.Tensor:
    if z.dim() < 3 or z.shape[-3] != len(values):
        raise ValueError(f"latent_norm 'imf-channel' is defined for {len(values)}-channel latents (..., "
                         f"{len(values)}, h, w), got shape {tuple(z.shape)}")
    return torch.tensor(values, dtype=z.dtype, device=z.device).view(-1, 1, 1)


def normalize(raw: torch.Tensor, norm: str) -> torch.Tensor:
    """Raw VAE latents (..., C, h, w) → the model's space."""
    check_latent_norm(norm)
    if norm == "sd-0.18215":
        return raw * SD_SCALE
    return (raw - _channel(IMF_CHANNEL_MEAN, raw)) / _channel(IMF_CHANNEL_STD, raw)


def normalize_std(raw_std: torch.Tensor, norm: str) -> torch.Tensor:
    """The raw posterior's std → the std of the normalised latent (the affine map's scale)."""
    check_latent_norm(norm)
    if norm == "sd-0.18215":
        return raw_std * SD_SCALE
    return raw_std / _channel(IMF_CHANNEL_STD, raw_std)


def denormalize(z: torch.Tensor, norm: str) -> torch.Tensor:
    """The model's space → raw VAE latents (what the VAE decoder takes)."""
    check_latent_norm(norm)
    if norm == "sd-0.18215":
        return z / SD_SCALE
    return z * _channel(IMF_CHANNEL_STD, z) + _channel(IMF_CHANNEL_MEAN, z)
