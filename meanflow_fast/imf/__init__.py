"""Improved MeanFlow (iMF, arXiv 2512.02012): the iMF DiT with its u- and v-heads, and the official
checkpoints' loader (docs/DESIGN.md, "8 Improved MeanFlow (iMF): the model"). IMFDiT is a registered
architecture of ``meanflow_fast.weights``: ``save_model`` / ``load_model`` keep it in the package's format."""
from ..weights import register_architecture
from .loss import IMFLoss
from .model import IMF_PRESETS, IMFConfig, IMFDiT, imf_dit
from .official import load_official_imf, official_state_dict

register_architecture("IMFDiT", IMFConfig, IMFDiT)

__all__ = ["imf_dit", "IMFLoss", "IMFDiT", "IMFConfig", "IMF_PRESETS", "load_official_imf", "official_state_dict"]
