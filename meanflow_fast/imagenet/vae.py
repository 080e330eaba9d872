"""SD-VAE (diffusers ``AutoencoderKL``): load from a hub id or a local directory, encode, decode.

Offline use: pass a local directory holding ``config.json`` and the weights (what ``save_pretrained``
writes, or a downloaded ``stabilityai/sd-vae-ft-ema``); no network is touched then.
"""
import os

import torch

from .common import UsageError
from .config import LATENT_SCALE

__all__ = ["load_vae", "encode", "decode_to_uint8"]


def load_vae(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise UsageError("the VAE needs diffusers: pip install -e '.[imagenet]'") from e
    if not isinstance(name_or_path, str) or not name_or_path:
        raise UsageError(f"--vae must be a hub id or a local directory, got {name_or_path!r}")
    looks_local = os.path.sep in name_or_path or name_or_path.startswith(".") or os.path.exists(name_or_path)
    if looks_local and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise UsageError(f"--vae {name_or_path}: not a diffusers AutoencoderKL directory (no config.json there)")
    try:
        from diffusers.utils import logging as dlogging
        dlogging.set_verbosity_error()  # no "install accelerate" banner on every rank
        vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype)
    except Exception as e:
        raise UsageError(f"--vae {name_or_path}: cannot load an AutoencoderKL ({type(e).__name__}: {e}); offline, "
                         f"pass a local directory") from e
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, x: torch.Tensor, mode: str = "mean", generator=None, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Images in [−1, 1] (B, 3, H, W) → latents × ``scale``. ``mode``: the posterior's mean
    (deterministic) or one sample of it."""
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    dist = vae.encode(x.to(vae.dtype)).latent_dist
    z = dist.mean if mode == "mean" else dist.sample(generator=generator)
    return z.float() * scale


@torch.no_grad()
def decode_to_uint8(vae, z: torch.Tensor, scale: float = LATENT_SCALE, chunk: int = 32) -> torch.Tensor:
    """Latents × ``scale`` → uint8 images (B, H, W, 3), decoded ``chunk`` at a time (the SD-VAE decoder's
    activations at 256² are ~0.1 GB per image in fp32)."""
    out = []
    for zc in z.split(chunk):
        x = vae.decode((zc / scale).to(vae.device, vae.dtype)).sample.float()
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out)
