"""meanflow-fast: MeanFlow training and one-step sampling, with fused Triton JVP kernels.

A user imports three names, and two more to keep a model::

    from meanflow_fast import meanflow_dit, MeanFlowLoss, sample
    from meanflow_fast import save_model, load_model   # one weights format; load_model also reads checkpoints
"""
from .loss import MeanFlowLoss, sample_t_r
from .model import PRESETS, DiTConfig, MeanFlowDiT, meanflow_dit
from .sampling import sample
from .weights import load_model, save_model
from .imf import IMFLoss, imf_dit, load_official_imf

__all__ = ["meanflow_dit", "MeanFlowLoss", "sample", "save_model", "load_model", "MeanFlowDiT", "DiTConfig",
           "PRESETS", "sample_t_r", "imf_dit", "IMFLoss", "load_official_imf"]
__version__ = "0.1.0"
