"""The face service runs on the CPU, and says so when asked for a GPU.

dlib-bin is dlib's CPU wheel (a CUDA dlib must be compiled against the machine's CUDA), and the
expression model is a 48x48 mini-Xception that takes ~27 ms per face on a CPU: tensorflow-cpu keeps
the image 1 GB smaller than a CUDA TensorFlow for no measurable gain. The HOG detector and the ResNet
embedding take 0.1-0.2 s per image on a CPU; a GPU pool is for the torch services.
"""

from percept.devices import Device, cpu_only

REASON = "dlib-bin and tensorflow-cpu are CPU builds (see services/facerec/device.py)"


def facerec_device(requested: str) -> Device:
    return cpu_only(requested, REASON)


def serving_device(requested: str) -> str:
    """The worker's start-up check (the declaration's `device`)."""
    return facerec_device(requested).description
