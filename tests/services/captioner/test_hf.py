"""Imported Hugging Face image-to-text checkpoints (services/captioner/hf.py), on tiny checkpoints built from
config after `torch.manual_seed(0)` and saved with `save_pretrained`, so the real loading and generation code
runs on CPU in seconds, offline."""

import io
import json
import os
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is ever downloaded

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from percept.predictor import PredictRequest, TrainingData  # noqa: E402
from services.captioner.hf import PREDICTOR, CheckpointImporter, HFCaptioner, check_caption_params  # noqa: E402

WORDS = "a dog cat runs on the grass sits red ball man near water".split()
_FIXED_TIME = (2024, 1, 1, 0, 0, 0)  # zip entry timestamps: the same checkpoint zips to the same bytes


def zip_directory(directory: Path, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            archive.writestr(zipfile.ZipInfo(prefix + path.relative_to(directory).as_posix(), _FIXED_TIME),
                             path.read_bytes())
    return buffer.getvalue()


def build_tiny_vit_gpt2(directory: Path, seed: int = 0) -> Path:
    """A ViT encoder + GPT-2 decoder VisionEncoderDecoderModel (32 px, width 32, 2 layers), a word-level
    tokenizer and a ViT image processor, saved as a checkpoint directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{word: i + 4 for i, word in enumerate(WORDS)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    encoder = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    decoder = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(vocab), n_positions=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def build_tiny_blip(directory: Path) -> Path:
    """A BlipForConditionalGeneration (32 px, width 32, 2 layers) with a BERT word-piece vocabulary."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory.parent / "blip-vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab_file), bos_token="[CLS]")
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config={"vocab_size": 5 + len(WORDS), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "encoder_hidden_size": 32,
                     "max_position_embeddings": 64, "bos_token_id": 2, "sep_token_id": 3, "pad_token_id": 0,
                     "eos_token_id": 3},
        projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(directory)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(directory)
    return directory


def tiny_checkpoint_zip(tmp_path: Path, seed: int = 0) -> bytes:
    """The tiny ViT-GPT-2 checkpoint directory, zipped (what a user uploads to POST /v1/models/import)."""
    return zip_directory(build_tiny_vit_gpt2(tmp_path / f"vit-gpt2-{seed}", seed))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    return build_tiny_vit_gpt2(tmp_path_factory.mktemp("hf") / "vit-gpt2")


@pytest.fixture(scope="module")
def checkpoint_zip(checkpoint_dir) -> bytes:
    return zip_directory(checkpoint_dir)


@pytest.fixture(scope="module")
def captioner(checkpoint_zip) -> HFCaptioner:
    predictor = HFCaptioner(artifact=checkpoint_zip, name="vit-gpt2", version="1")
    predictor.setup()
    return predictor


def picture(colour=(200, 40, 40), size=(48, 40)) -> Image.Image:
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste(colour, (8, 8, 24, 24))
    return image


def import_checkpoint(archive: bytes):
    return CheckpointImporter().train(TrainingData(archive=archive, limits=None), {"name": "mine"},
                                      lambda *args: None)


def test_the_importer_accepts_a_checkpoint_and_names_the_predictor_that_serves_it(checkpoint_zip):
    result = import_checkpoint(checkpoint_zip)
    assert result.predictor == PREDICTOR == "services.captioner.hf:HFCaptioner"
    assert result.model_kind == "caption"
    assert result.artifact == checkpoint_zip  # the zip itself is the model's artifact
    assert result.card["type"] == "huggingface" and result.card["pipeline"] == "image-to-text"
    assert result.card["architecture"] == "VisionEncoderDecoderModel"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= \
        set(result.card["files"])
    assert result.output == {"architecture": "VisionEncoderDecoderModel"}
    assert result.device == "cpu"


def test_a_checkpoint_in_one_top_folder_is_found(checkpoint_dir):
    result = import_checkpoint(zip_directory(checkpoint_dir, prefix="my-captioner/"))
    assert "config.json" in result.card["files"]


def test_the_captioner_describes_what_it_loaded(captioner, checkpoint_zip):
    import hashlib

    info = captioner.setup()
    assert info.sha256 == hashlib.sha256(checkpoint_zip).hexdigest()
    assert info.device == "cpu" and (info.name, info.version) == ("vit-gpt2", "1")
    assert {"transformers", "torch"} <= info.libraries.keys()
    assert captioner.input_size == 32  # from the image processor's size


def test_n_best_captions_are_distinct_best_first_and_respect_the_params(captioner):
    [output] = captioner.predict([PredictRequest([picture()], {"beam_width": 5, "num_captions": 4,
                                                               "max_length": 6})])
    captions = output["captions"]
    assert 1 < len(captions) <= 4
    texts = [caption["text"] for caption in captions]
    assert len(set(texts)) == len(texts)
    scores = [caption["score"] for caption in captions]
    assert scores == sorted(scores, reverse=True)
    for caption in captions:
        assert caption["tokens"] == caption["text"].split()
        assert 1 <= len(caption["tokens"]) <= 6  # max_length new tokens, min_length 1 by default
        assert set(caption["tokens"]) <= set(WORDS)
        assert caption["log_prob"] < 0 and caption["log_prob"] <= caption["score"]  # length_penalty 1


def test_one_caption_by_default_and_greedy_decoding_matches_a_beam_of_one(captioner):
    image = picture((30, 160, 90))
    [default] = captioner.predict([PredictRequest([image], {})])
    assert len(default["captions"]) == 1
    [greedy, single] = captioner.predict([PredictRequest([image], {"beam_width": 1}),
                                          PredictRequest([image], {"beam_width": 1, "model": "vit-gpt2:1"})])
    # Unknown keys (the runtime adds `model`) are ignored; in one batch, the scores agree to float precision.
    assert [c["text"] for c in greedy["captions"]] == [c["text"] for c in single["captions"]]
    assert greedy["captions"][0]["log_prob"] == pytest.approx(single["captions"][0]["log_prob"], abs=1e-4)
    [first] = captioner.predict([PredictRequest([image], {"beam_width": 1})])
    [again] = captioner.predict([PredictRequest([image], {"beam_width": 1})])
    assert again == first  # deterministic


def test_a_batch_answers_each_request_with_its_own_params(captioner):
    requests = [PredictRequest([picture()], {"beam_width": 3, "num_captions": 3, "max_length": 3}),
                PredictRequest([picture((0, 0, 255))], {"beam_width": 1, "max_length": 8, "min_length": 8}),
                PredictRequest([picture()], {"beam_width": 3, "num_captions": 3, "max_length": 3})]
    first, second, third = captioner.predict(requests)
    assert [c["text"] for c in first["captions"]] == [c["text"] for c in third["captions"]]
    assert len(first["captions"]) > 1
    assert all(len(c["tokens"]) <= 3 for c in first["captions"])
    [only] = second["captions"]
    assert len(only["tokens"]) == 8  # min_length holds the end token back


def test_seeded_sampling_is_reproducible(captioner):
    params = {"beam_width": 2, "num_captions": 2, "temperature": 1.5, "seed": 7, "max_length": 6}
    [first] = captioner.predict([PredictRequest([picture()], params)])
    [second] = captioner.predict([PredictRequest([picture()], params)])
    assert first == second and first["captions"]


@pytest.mark.parametrize("params, problem", [
    ({"num_captions": 4, "beam_width": 3}, "num_captions"),
    ({"beam_width": 0}, "beam_width"),
    ({"beam_width": 99}, "beam_width"),
    ({"beam_width": "3"}, "beam_width"),
    ({"max_length": 0}, "max_length"),
    ({"max_length": 4, "min_length": 5}, "min_length"),
    ({"length_penalty": float("nan")}, "length_penalty"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"temperature": 0}, "temperature"),
])
def test_bad_params_raise_a_coded_value_error(captioner, params, problem):
    with pytest.raises(ValueError, match=rf"^\[invalid_parameters\] .*{problem}"):
        captioner.predict([PredictRequest([picture()], params)])
    with pytest.raises(ValueError, match=r"^\[invalid_parameters\]"):
        check_caption_params(params)


def test_a_request_needs_exactly_one_image(captioner):
    with pytest.raises(ValueError, match=r"^\[invalid_input\]"):
        captioner.predict([PredictRequest([picture(), picture()], {})])


def test_a_blip_checkpoint_is_imported_and_served(tmp_path):
    archive = zip_directory(build_tiny_blip(tmp_path / "blip"))
    result = import_checkpoint(archive)
    assert result.card["architecture"] == "BlipForConditionalGeneration"
    [output] = HFCaptioner(artifact=archive).predict([PredictRequest([picture()], {"beam_width": 3,
                                                                                   "num_captions": 2})])
    assert 1 <= len(output["captions"]) <= 2 and all(c["text"] for c in output["captions"])


# --------------------------------------------------------------------------- what is not a checkpoint

def rezip(checkpoint_dir: Path, drop: tuple[str, ...] = (), extra: dict[str, bytes] | None = None,
          edit_config=None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(checkpoint_dir.iterdir()):
            if path.name in drop:
                continue
            data = path.read_bytes()
            if path.name == "config.json" and edit_config is not None:
                config = json.loads(data)
                edit_config(config)
                data = json.dumps(config).encode()
            archive.writestr(path.name, data)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _unsupported(config: dict) -> None:
    config["architectures"] = ["ResNetForImageClassification"]


def _wrong_shapes(config: dict) -> None:
    config["decoder"]["n_embd"] = 64


@pytest.mark.parametrize("breakage, code, says", [
    ({"drop": ("config.json",)}, "invalid_checkpoint", "no config.json"),
    ({"drop": ("model.safetensors",)}, "invalid_checkpoint", "no weights file"),
    ({"drop": ("preprocessor_config.json",)}, "invalid_checkpoint", "no preprocessor_config.json"),
    ({"drop": ("tokenizer.json", "tokenizer_config.json")}, "invalid_checkpoint", "no tokenizer files"),
    ({"edit_config": _unsupported}, "invalid_checkpoint", "Unsupported architecture ResNetForImageClassification"),
    ({"edit_config": _wrong_shapes}, "invalid_checkpoint", "weights"),
    ({"extra": {"../evil.txt": b"x"}}, "unsafe_zip_path", "unsafe path"),
    ({"extra": {"/etc/evil": b"x"}}, "unsafe_zip_path", "unsafe path"),
])
def test_a_zip_that_is_not_a_checkpoint_fails_with_a_sentence(checkpoint_dir, breakage, code, says):
    archive = rezip(checkpoint_dir, **breakage)
    with pytest.raises(ValueError, match=rf"^\[{code}\] .*{says}"):
        import_checkpoint(archive)
    with pytest.raises(ValueError, match=rf"^\[{code}\]"):
        HFCaptioner(artifact=archive).setup()


def test_a_symbolic_link_in_the_zip_is_refused(checkpoint_dir):
    buffer = io.BytesIO(rezip(checkpoint_dir))
    with zipfile.ZipFile(buffer, "a") as archive:
        link = zipfile.ZipInfo("tokenizer_link.json")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ValueError, match=r"^\[unsafe_zip_path\] .*symbolic link"):
        import_checkpoint(buffer.getvalue())


def test_bytes_that_are_not_a_zip_are_refused():
    with pytest.raises(ValueError, match=r"^\[not_a_zip\]"):
        import_checkpoint(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"^\[invalid_checkpoint\]"):
        import_checkpoint(b"")
