"""ImageNet 256 pipeline: latent extraction, DDP training, sampling to .npz and FID.

Commands (console scripts, or ``python -m meanflow_fast.imagenet.<name>`` under torchrun):
``meanflow-extract``, ``meanflow-train``, ``meanflow-sample``, ``meanflow-fid``. See docs/IMAGENET.md.
"""
from .config import LATENT_SCALE, TRAIN_PRESETS
from .inception import FIDInceptionV3, load_fid_inception

__all__ = ["TRAIN_PRESETS", "LATENT_SCALE", "FIDInceptionV3", "load_fid_inception"]
