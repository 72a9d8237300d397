"""The captioner's two commands, run as a user and an operator would, on a real platform of their own (gateway,
captioner-train worker):

- `percept train captioner ZIP`: upload, analysis, training with a progress bar, then the BLEU table;
- `percept models import DIR --tenant T`: straight to storage and the database, no upload, and the job's
  own error when the directory is no checkpoint."""

import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.own_platform import OwnPlatform, own_platform
from tests.scenes import scenes_zip
from tests.services.captioner.test_hf import build_tiny_vit_gpt2
from tests.synthetic import make_samples, write_zip

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def plat(tmp_path_factory) -> Iterator[OwnPlatform]:
    with own_platform(tmp_path_factory.mktemp("cli-captioner"), HF_HUB_OFFLINE="1") as plat:
        plat.start_worker("captioner-train-worker", "captioner-train")
        yield plat


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny ViT-GPT2 checkpoint directory `save_pretrained` wrote (built offline, once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return build_tiny_vit_gpt2(tmp_path_factory.mktemp("checkpoint") / "vit-gpt2")


def percept(plat: OwnPlatform, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "percept.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=plat.env(COLUMNS="120"))


def printed(result: subprocess.CompletedProcess) -> str:
    return " ".join((result.stdout + result.stderr).split())  # rich wraps long lines


def test_train_captioner_shows_progress_then_the_bleu_table_and_examples(plat, tmp_path):
    archive = tmp_path / "scenes.zip"
    archive.write_bytes(scenes_zip(200, seed=0, size=64, split=(150, 25, 25)))
    result = percept(plat, "train", "captioner", str(archive), "--name", "scenes-cli", "--epochs", "4",
                     "--beam-width", "3", "--url", plat.url, "--key", plat.new_key())
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "200 images" in out and "scenes-cli version 1" in out
    for column in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert column in out
    rows = {label: re.findall(r"\d\.\d{3}", line) for line in out.splitlines()
            for label in ("greedy", "beam-3") if line.startswith("│") and line.strip("│ ").startswith(label)}
    assert len(rows["greedy"]) == len(rows["beam-3"]) == 4
    assert all(0 <= float(score) <= 1 for score in rows["greedy"] + rows["beam-3"])
    assert out.count("reference ") >= 3 and "greedy " in out and "beam " in out


def test_train_captioner_refuses_a_class_folder_dataset(plat, tmp_path):
    archive = tmp_path / "classes.zip"
    buffer = io.BytesIO()
    write_zip(make_samples({"red-circle": 6, "blue-square": 6}, seed=0, size=32), buffer)
    archive.write_bytes(buffer.getvalue())
    result = percept(plat, "train", "captioner", str(archive), "--name", "nope", "--url", plat.url,
                     "--key", plat.new_key(), timeout=180)
    assert result.returncode != 0
    assert "dataset refused" in printed(result) and "captioned images" in printed(result)


def test_models_import_registers_a_checkpoint_directory_for_the_tenant(plat, checkpoint):
    result = percept(plat, "models", "import", str(checkpoint), "--name", "imported-vit", "--tenant", "ops-acme",
                     "--timeout", "300")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported-vit version 1" in printed(result)

    with plat.client(plat.new_key("ops-acme")) as client:
        model = client.get("/v1/models/imported-vit").json()
    assert model["kind"] == "caption" and model["latest"] == "1" and not model["builtin"]
    assert model["versions"][0]["card"]["type"] == "huggingface"
    with plat.client(plat.new_key()) as other:  # another tenant does not see it
        assert other.get("/v1/models/imported-vit").status_code == 404


def test_models_import_of_a_directory_without_config_fails_with_the_jobs_message(plat, checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "no-config")
    (broken / "config.json").unlink()
    result = percept(plat, "models", "import", str(broken), "--name", "broken-vit", "--tenant", "ops-acme",
                     "--timeout", "300")
    assert result.returncode != 0
    assert "invalid_checkpoint" in printed(result) and "config.json" in printed(result)
    with plat.client(plat.new_key("ops-acme")) as client:
        assert client.get("/v1/models/broken-vit").status_code == 404


def test_models_import_refuses_a_file_that_is_not_a_zip(plat, tmp_path):
    not_zip = tmp_path / "weights.bin"
    not_zip.write_bytes(b"not a zip")
    result = percept(plat, "models", "import", str(not_zip), "--name", "x", "--tenant", "ops-acme", timeout=120)
    assert result.returncode != 0 and "not a zip" in printed(result)


def test_models_import_refuses_a_built_in_name(plat, checkpoint):
    result = percept(plat, "models", "import", str(checkpoint), "--name", "imagenet-efficientnet-lite0",
                     "--tenant", "ops-acme", timeout=120)
    assert result.returncode == 1 and "built-in" in printed(result)
