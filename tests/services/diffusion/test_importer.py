"""The `import_pipeline` job (services/diffusion/importer.py): a pipeline zip validated by loading and rendering
it, registered as is; what is not a usable pipeline fails the job with a sentence."""

import json
import re
import shutil

import pytest
import torch

from percept.predictor import JobCanceled, PredictRequest, TrainingData
from services.diffusion.importer import PipelineImporter
from services.diffusion.predictor import PREDICTOR, TextToImagePredictor
from tests.diffusion_pipelines import build_tiny_sdxl_pipeline, zip_directory


def import_pipeline(archive: bytes | None, on_step=None):
    return PipelineImporter().train(TrainingData(archive=archive, limits=None), {"name": "mine"},
                                    on_step or (lambda *args: None))


def test_a_pipeline_zip_is_registered_as_is_with_its_card(pipeline_zip):
    stages = []

    result = import_pipeline(pipeline_zip, lambda done, total, info=None: stages.append((done, total, info)))

    assert result.artifact is pipeline_zip
    assert (result.predictor, result.model_kind, result.device) == (PREDICTOR, "text-to-image", "cpu")
    assert result.metrics == {}
    card = result.card
    assert re.fullmatch(r"[0-9a-f]{64}", card.pop("test_image_sha256"))
    files = card.pop("files")
    assert card == {"type": "diffusers", "pipeline": "StableDiffusionPipeline", "default_scheduler": "PNDM",
                    "default_size": [64, 64],
                    "components": {"scheduler": "PNDMScheduler", "text_encoder": "CLIPTextModel",
                                   "tokenizer": "CLIPTokenizer", "unet": "UNet2DConditionModel",
                                   "vae": "AutoencoderKL"},
                    "parameters": card["parameters"], "safety_checker": "none", "attention": "sdpa",
                    "dtype": "float32"}
    assert card["parameters"] > 1_000_000
    assert "model_index.json" in files and "vae/diffusion_pytorch_model.safetensors" in files
    json.dumps(result.card)  # the card is stored as JSON
    assert result.output == {"pipeline": "StableDiffusionPipeline", "default_scheduler": "PNDM",
                             "default_size": [64, 64]}
    assert [(done, total) for done, total, _ in stages] == [(0, 2), (1, 2), (2, 2)]
    assert [info["stage"] for _, _, info in stages[:2]] == ["loading", "test image"]


def test_the_registered_artifact_serves_and_the_test_image_is_reproducible(pipeline_zip):
    first, second = import_pipeline(pipeline_zip), import_pipeline(pipeline_zip)

    assert first.card["test_image_sha256"] == second.card["test_image_sha256"]
    served = TextToImagePredictor(artifact=first.artifact, name="mine", version="1")
    [output] = served.predict([PredictRequest([], {"prompt": "a cat", "seed": 1, "steps": 2})])
    assert output["images"][0]["generation"]["model"]["name"] == "mine"


def test_an_sdxl_pipeline_imports_and_serves(tmp_path):
    archive = zip_directory(build_tiny_sdxl_pipeline(tmp_path / "sdxl"))

    result = import_pipeline(archive)

    assert (result.card["pipeline"], result.card["default_scheduler"], result.card["default_size"]) == \
        ("StableDiffusionXLPipeline", "Euler", [64, 64])
    assert {"text_encoder_2", "tokenizer_2"} <= set(result.card["components"])
    served = TextToImagePredictor(artifact=result.artifact, name="xl", version="1")
    [output] = served.predict([PredictRequest([], {"prompt": "a cat", "negative_prompt": "a dog", "seed": 3,
                                                   "steps": 2, "width": 96, "scheduler": "DPM++ 2M Karras"})])
    [image] = output["images"]
    assert (image["width"], image["height"]) == (96, 64)
    assert (image["generation"]["pipeline"], image["generation"]["scheduler"]) == \
        ("StableDiffusionXLPipeline", "DPM++ 2M Karras")


def _mismatched_text_encoder(directory):
    """A text encoder of width 16 beside a UNet that attends to width 32: each loads, together they cannot render."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = json.loads((directory / "text_encoder" / "config.json").read_text())
    shutil.rmtree(directory / "text_encoder")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=config["vocab_size"], hidden_size=16, intermediate_size=37,
                                 num_hidden_layers=2, num_attention_heads=4, bos_token_id=config["bos_token_id"],
                                 eos_token_id=config["eos_token_id"], pad_token_id=config["pad_token_id"])
                  ).save_pretrained(directory / "text_encoder")


def _no_unet(directory):
    shutil.rmtree(directory / "unet")


def _inpainting(directory):
    index = json.loads((directory / "model_index.json").read_text())
    (directory / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))


def _truncated_vae(directory):
    weights = directory / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _no_model_index(directory):
    (directory / "model_index.json").unlink()


@pytest.mark.parametrize(("damage", "says"), [
    (_mismatched_text_encoder, "fails to render"),
    (_no_unet, "no unet/ folder"),
    (_inpainting, "StableDiffusionInpaintPipeline is a pipeline that needs an input image"),
    (_truncated_vae, "does not load"),
    (_no_model_index, "no model_index.json at its top level"),
])
def test_a_zip_that_is_not_a_usable_pipeline_fails_the_import_with_a_sentence(pipeline_dir, tmp_path, damage,
                                                                               says):
    directory = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, directory)
    damage(directory)

    with pytest.raises(ValueError) as refused:
        import_pipeline(zip_directory(directory))

    assert str(refused.value).startswith("[invalid_checkpoint] ")
    assert says in str(refused.value)


def test_an_import_without_a_zip_or_with_another_file_is_refused():
    with pytest.raises(ValueError, match=r"^\[invalid_checkpoint\] The import has no pipeline zip"):
        import_pipeline(None)
    with pytest.raises(ValueError, match=r"^\[not_a_zip\]"):
        import_pipeline(b"\x89PNG not a zip")


def test_a_canceled_import_stops(pipeline_zip):
    def cancel_after_loading(done, total, info=None):
        if done == 1:
            raise JobCanceled()

    with pytest.raises(JobCanceled):
        import_pipeline(pipeline_zip, cancel_after_loading)
