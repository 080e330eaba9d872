"""meanflow-fast: MeanFlow training and one-step sampling, with fused Triton JVP kernels.

A user imports three names::

    from meanflow_fast import meanflow_dit, MeanFlowLoss, sample
"""
from .loss import MeanFlowLoss, sample_t_r
from .model import PRESETS, DiTConfig, MeanFlowDiT, meanflow_dit
from .sampling import sample

__all__ = ["meanflow_dit", "MeanFlowLoss", "sample", "MeanFlowDiT", "DiTConfig", "PRESETS", "sample_t_r"]
__version__ = "0.1.0"
