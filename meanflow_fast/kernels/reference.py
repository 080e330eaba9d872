"""Small helpers shared by the pure-torch references."""
import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """References run fp16/bf16 inputs in fp32 (as the kernels accumulate) and fp32/fp64 as given."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype
