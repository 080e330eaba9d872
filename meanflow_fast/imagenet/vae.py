"""SD-VAE (diffusers ``AutoencoderKL``): load from a hub id or a local directory, encode, decode.

Offline use: pass a local directory holding ``config.json`` and the weights (what ``save_pretrained``
writes, or a downloaded ``stabilityai/sd-vae-ft-ema``); no network is touched then. A hub id
(``owner/name``, not an existing path) is fetched by diffusers; with ``HF_HUB_OFFLINE`` set, or when
the hub cannot be reached, only the local Hugging Face cache is tried, so a failure comes at once.
"""
import os
import re

import torch

from .common import UsageError
from .config import LATENT_SCALE

__all__ = ["load_vae", "check_vae_arg", "is_hub_id", "encode", "decode_to_uint8"]

# owner/name as the Hugging Face hub spells repository ids
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_hub_id(name_or_path: str) -> bool:
    """``owner/name`` that is not an existing path: what ``--vae`` takes for a Hugging Face hub id."""
    return (bool(_HUB_ID.fullmatch(name_or_path)) and ".." not in name_or_path and "--" not in name_or_path
            and len(name_or_path) <= 96 and not os.path.exists(name_or_path))


def _how_to_pass_local(hub_id: str) -> str:
    return (f"pass a local directory instead (--vae DIR): a folder with config.json and the weights, e.g. made on "
            f"a machine with network by AutoencoderKL.from_pretrained({hub_id!r}).save_pretrained(DIR)")


def check_vae_arg(name_or_path: str) -> None:
    """Raise UsageError unless ``--vae`` is a hub id or a directory holding ``config.json`` (no
    network, no diffusers import: for the commands' argument checks)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise UsageError(f"--vae must be a Hugging Face hub id (owner/name) or a local directory, got "
                         f"{name_or_path!r}")
    if is_hub_id(name_or_path):
        return
    if not os.path.exists(name_or_path):
        raise UsageError(f"--vae {name_or_path}: no such directory (expected a local diffusers AutoencoderKL "
                         f"directory, or a Hugging Face hub id such as stabilityai/sd-vae-ft-ema)")
    if not os.path.isdir(name_or_path):
        raise UsageError(f"--vae {name_or_path} is not a directory (expected a diffusers AutoencoderKL directory "
                         f"with config.json and the weights)")
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise UsageError(f"--vae {name_or_path}: not a diffusers AutoencoderKL directory (no config.json there)")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, also when set after its import."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    if any(v is not None and v.upper() in ("1", "ON", "YES", "TRUE") for v in flags):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _hub_reachable() -> bool:
    """One request to the hub's endpoint, without retries (huggingface_hub retries a failed connection
    for ~25 s before giving up). An HTTP answer of any status counts as reachable."""
    try:
        from huggingface_hub import constants, get_session
    except ImportError:
        return True  # cannot tell: let diffusers try
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception:  # DNS, refused connection, proxy, TLS, timeout
        return False
    return True


def load_vae(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    check_vae_arg(name_or_path)
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as dlogging
    except ImportError as e:
        raise UsageError("the VAE needs diffusers: pip install -e '.[imagenet]'") from e
    dlogging.set_verbosity_error()  # no "install accelerate" banner on every rank
    if not is_hub_id(name_or_path):
        try:
            vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype)
        except Exception as e:
            raise UsageError(f"--vae {name_or_path}: cannot load an AutoencoderKL from this directory "
                             f"({type(e).__name__}: {e})") from e
    elif _hub_offline() or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub cannot be reached"
        try:
            vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype, local_files_only=True)
        except Exception as e:
            raise UsageError(f"--vae {name_or_path} is a Hugging Face hub id that could not be downloaded ({why}) "
                             f"and is not in the local Hugging Face cache; {_how_to_pass_local(name_or_path)}") from e
    else:
        try:
            vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype)
        except Exception as e:
            raise UsageError(f"--vae {name_or_path}: cannot load an AutoencoderKL from this Hugging Face hub id "
                             f"({type(e).__name__}: {e}); {_how_to_pass_local(name_or_path)}") from e
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
def decode_to_uint8(vae, z: torch.Tensor, latent_norm: str = "sd-0.18215", chunk: int = 32) -> torch.Tensor:
    """Latents in the ``latent_norm`` convention (``latents.LATENT_NORMS``) → uint8 images (B, H, W, 3),
    decoded ``chunk`` at a time (the SD-VAE decoder's activations at 256² are ~0.1 GB per image in fp32)."""
    from .latents import denormalize
    out = []
    for zc in z.split(chunk):
        raw = denormalize(zc.float(), latent_norm)
        x = vae.decode(raw.to(vae.device, vae.dtype)).sample.float()
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out)
