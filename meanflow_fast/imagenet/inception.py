"""The FID Inception-v3 (pool3, 2048-d features) in plain torch.

This is the network of the TensorFlow FID graph (``pt_inception-2015-12-05-*.pth`` holds its weights
converted to torch): Inception-v3 with 1008 output classes and the FID variants of its blocks —
average pooling that ignores padding (``count_include_pad=False``) in the A, C and first E blocks, and
max pooling in the last E block's pool branch. Parameter names follow that weights file, so
``load_state_dict`` is strict.

Input: float images in [0, 1], (B, 3, H, W); they are resized to 299×299 (bilinear) and mapped to
[−1, 1], as pytorch-fid does. Output: (B, 2048) pool3 features.
"""
import os
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import UsageError

__all__ = ["FIDInceptionV3", "load_fid_inception"]


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3) → ReLU."""

    def __init__(self, cin: int, cout: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # Mixed_5b/c/d: 35×35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b1, b5, b3, self.branch_pool(_avg3(x))], 1)


class BlockB(nn.Module):  # Mixed_6a: 35×35 → 17×17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockC(nn.Module):  # Mixed_6b/c/d/e: 17×17, factorised 7×7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):  # Mixed_7a: 17×17 → 8×8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockE(nn.Module):  # Mixed_7b (avg pool, padding excluded) / Mixed_7c (max pool): 8×8
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """``forward(x in [0, 1], (B, 3, H, W)) → (B, 2048)`` pool3 features."""

    feature_dim = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the logits of the TF graph; unused for FID, kept for strict loading

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            desc = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be a float tensor (B, 3, H, W) with values in [0, 1], got {desc}")
        if x.shape[0] == 0:
            raise ValueError("x is an empty batch (B = 0)")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                    # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                                  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))     # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                    # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                             # (B, 2048)


def load_fid_inception(path: str, device="cpu") -> FIDInceptionV3:
    """The FID Inception with weights from ``path`` (a torch state dict, e.g.
    pt_inception-2015-12-05-6726825d.pth, or a .safetensors file), in eval mode."""
    if not isinstance(path, str) or not path:
        raise UsageError(f"--inception-weights must be a file path, got {path!r}")
    if not os.path.isfile(path):
        raise UsageError(f"--inception-weights {path} not found (the FID Inception weights file, "
                         f"pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd: Dict[str, torch.Tensor] = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--inception-weights {path} cannot be read as a torch state dict ({type(e).__name__}: {e})")
    if not isinstance(sd, dict):
        raise UsageError(f"--inception-weights {path} does not hold a state dict (got {type(sd).__name__})")
    net = FIDInceptionV3()
    expected = set(net.state_dict())
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing, unexpected = expected - set(sd) - optional, set(sd) - expected
    if missing or unexpected:
        raise UsageError(f"--inception-weights {path} is not the FID Inception-v3: {len(missing)} missing key(s) "
                         f"{sorted(missing)[:3]}, {len(unexpected)} unexpected key(s) {sorted(unexpected)[:3]}")
    try:
        net.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise UsageError(f"--inception-weights {path}: shapes do not match the FID Inception-v3 ({e})")
    return net.to(device).eval().requires_grad_(False)
