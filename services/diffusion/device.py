"""Where the diffusion service's pipelines run: PERCEPT_DEVICE, resolved once per process."""

from functools import cache

import torch

from percept.config import get_settings
from percept.devices import Device, choose_device


@cache
def torch_device() -> Device:
    """The device every pipeline of this process loads onto and renders on."""
    return choose_device(get_settings().device, torch.cuda)


def serving_device(requested: str) -> str:
    """The worker's start-up check (the declaration's `device`): the device described, or ValueError."""
    return choose_device(requested, torch.cuda).description
