"""The LSTM captioner end to end on synthetic captioned scenes (tests/scenes.py): `CaptionerTrainer` on a
Flickr8k-layout zip with the real ImageNet EfficientNet-Lite0 encoder, then the served `LSTMCaptioner` on
held-out scenes drawn from another seed, scored with sacrebleu.

The encoder pass dominates the cost (~20 ms per image on 2 CPU cores), so one model is trained per module
and every later training run reuses its feature cache (a dict standing in for object storage: the
platform tests use the real store).
"""

import hashlib
import io
import re

import numpy as np
import pytest
import torch
from sacrebleu.metrics import BLEU

from percept.captions import tokenize
from percept.datasets import DatasetLimits
from percept.imaging import decode_rgb
from percept.predictor import JobCanceled, PredictRequest, TrainingData, TrainingResult
from services.captioner.model import (
    END,
    START,
    CaptionDecoder,
    DecoderConfig,
    Vocabulary,
    initialise_embeddings,
    load_caption_model,
)
from services.captioner.predictor import LSTMCaptioner
from services.captioner.training import CaptionerTrainer, read_glove
from tests.scenes import COLOURS, SHAPES, add_files, make_scenes, scenes_zip

SPLIT = (300, 50, 60)
HELD_OUT = 80  # scenes from another seed, never seen in training
PARAMS = {"name": "scenes", "epochs": 15, "min_word_count": 1, "learning_rate": 3e-3, "dropout": 0.3,
          "embedding_dim": 128, "hidden_size": 256, "batch_size": 64, "seed": 0}


class DictCache:
    """The FeatureCache contract over a dict, counting gets and puts."""

    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}
        self.puts = 0

    def get(self, key: str) -> bytes | None:
        assert ".." not in key and not key.startswith("/")
        return self.items.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.puts += 1
        self.items[key] = data


class Progress:
    def __init__(self, cancel_at_stage: str | None = None) -> None:
        self.calls: list[dict] = []
        self.cancel_at_stage = cancel_at_stage

    def __call__(self, done: int, total: int, info: dict | None = None) -> None:
        self.calls.append({"done": done, "total": total, **(info or {})})
        if info and info.get("stage") == self.cancel_at_stage:
            raise JobCanceled()

    @property
    def epochs(self) -> list[dict]:
        return [call for call in self.calls if "val_loss" in call]


def train(zip_bytes: bytes, cache: DictCache, on_step=None, **params) -> TrainingResult:
    data = TrainingData(archive=zip_bytes, limits=DatasetLimits(), cache=cache, dataset={"sha256": "d" * 64})
    return CaptionerTrainer(device="cpu").train(data, {**PARAMS, **params}, on_step or Progress())


@pytest.fixture(scope="module")
def scenes() -> bytes:
    return scenes_zip(sum(SPLIT), seed=0, split=SPLIT)


@pytest.fixture(scope="module")
def cache() -> DictCache:
    return DictCache()


@pytest.fixture(scope="module")
def trained(scenes: bytes, cache: DictCache) -> tuple[TrainingResult, Progress]:
    progress = Progress()
    return train(scenes, cache, progress), progress


@pytest.fixture(scope="module")
def captioner(trained) -> LSTMCaptioner:
    result, _ = trained
    return LSTMCaptioner(artifact=result.artifact, name="scenes", version="1", device="cpu")


@pytest.fixture(scope="module")
def held_out():
    scenes = make_scenes(HELD_OUT, seed=1)
    images = [decode_rgb(scene.image, 10**7, at_least=LSTMCaptioner.input_size) for scene in scenes]
    return scenes, images


def caption_all(captioner: LSTMCaptioner, images, **params) -> list[dict]:
    return captioner.predict([PredictRequest(images=[image], params=params) for image in images])


def bleu4(hypotheses: list[str], scenes) -> float:
    references = [[" ".join(tokenize(scene.captions[j])) for scene in scenes] for j in range(5)]
    return BLEU(tokenize="none").corpus_score(hypotheses, references).score / 100


# --- training ------------------------------------------------------------------------------------------


def test_training_reports_bleu_progress_and_the_contract(trained):
    result, progress = trained
    assert result.predictor == "services.captioner.predictor:LSTMCaptioner"
    assert result.model_kind == "caption"
    assert result.device == "cpu"
    bleu = result.metrics["bleu"]
    assert bleu == result.output["bleu"] == result.card["bleu"]
    assert bleu["beam_width"] == 3 and len(bleu["greedy"]) == len(bleu["beam"]) == 4
    assert all(0 <= b <= 1 for b in bleu["greedy"] + bleu["beam"])
    # Both decodings caption the test split well. Which scores higher BLEU is the model's to say: beam search
    # finds likelier captions (checked on held-out scenes below), and on these scenes a likelier phrasing ("the
    # star is red and big") can share fewer 4-grams with the references than greedy's.
    assert bleu["beam"][3] >= 0.6 and bleu["greedy"][3] >= 0.6
    # BLEU-1 >= BLEU-2 >= ... (cumulative n-gram orders)
    assert bleu["beam"] == sorted(bleu["beam"], reverse=True)
    # One vocabulary: every scene word, markers and <pad>/<unk>
    words = {w for w in result.card["vocabulary"]}
    assert set(COLOURS) | set(SHAPES) | {"startseq", "endseq", "background"} <= words
    assert result.metrics["vocabulary_size"] == len(words)
    assert result.metrics["max_length"] >= 9  # "there is a ... of the picture" has 11 words
    assert result.output["dataset"] == {
        "images": 410, "captions": 2050, "train_images": 300, "dev_images": 50, "test_images": 60,
        "split_made": None, "unsplit_images": 0, "skipped_files": [],
        "feature_cache": {"hits": 0, "misses": 410}}
    assert result.metrics["evaluated_on"] == "test"
    examples = result.output["examples"]
    assert len(examples) == 5 and all(len(e["references"]) == 5 and e["greedy"] and e["beam"] for e in examples)
    assert result.card["dataset_sha256"] == "d" * 64
    assert result.card["encoder_weights_sha256"] and result.card["config"]["architecture"] == "merge"
    # Progress: the feature pass, then one report per epoch with loss and val loss, BLEU-4 every 5 epochs
    assert progress.calls[0]["stage"] == "features"
    epochs = progress.epochs
    assert [e["epoch"] for e in epochs] == list(range(1, result.metrics["epochs_run"] + 1))
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] and epochs[-1]["loss"] < epochs[0]["loss"]
    assert "dev_bleu4" in epochs[4] and "dev_bleu4" not in epochs[3]


def test_retraining_the_same_photos_hits_the_cache_and_is_deterministic(trained, scenes, cache):
    result, _ = trained
    puts = cache.puts
    again = train(scenes, cache)
    assert again.output["dataset"]["feature_cache"] == {"hits": 410, "misses": 0}
    assert cache.puts == puts  # nothing recomputed
    assert hashlib.sha256(again.artifact).hexdigest() == hashlib.sha256(result.artifact).hexdigest()
    assert again.metrics["bleu"] == result.metrics["bleu"]


def test_another_seed_gives_another_model(scenes, cache, trained):
    other = train(scenes, cache, epochs=2, seed=1)
    first = train(scenes, cache, epochs=2, seed=0)
    assert other.artifact != first.artifact != trained[0].artifact


def test_inject_architecture_trains(scenes, cache):
    result = train(scenes, cache, architecture="inject", epochs=6)
    history = result.metrics["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert result.metrics["bleu"]["beam"][3] > 0.3
    assert result.card["architecture"] == "inject"
    model = load_caption_model(result.artifact, "cpu", result.card["encoder_weights_sha256"])
    assert model.config.architecture == "inject" and model.decoder.combine is None


def test_cancel_between_batches_stops_training(scenes, cache):
    progress = Progress(cancel_at_stage="train")
    with pytest.raises(JobCanceled):
        train(scenes, cache, progress, epochs=50)
    assert len(progress.epochs) <= 1  # stopped in or right after the first epoch


def test_a_dataset_without_split_files_gets_a_seeded_split(cache):
    no_splits = scenes_zip(sum(SPLIT), seed=0, split=SPLIT, with_splits=False)  # the same photos
    result = train(no_splits, cache, epochs=1, val_fraction=0.1)
    dataset = result.output["dataset"]
    assert dataset["split_made"] == "dev+test"
    assert (dataset["train_images"], dataset["dev_images"], dataset["test_images"]) == (328, 41, 41)
    assert dataset["feature_cache"] == {"hits": 410, "misses": 0}


@pytest.mark.parametrize(("params", "code"), [
    ({"architecture": "transformer"}, "invalid_architecture"),
    ({"epochs": 0}, "invalid_epochs"),
    ({"learning_rate": -1}, "invalid_learning_rate"),
    ({"max_length": 0}, "invalid_max_length"),
    ({"dropout": 1.0}, "invalid_dropout"),
    ({"batch_size": True}, "invalid_batch_size"),
    ({"val_fraction": 0.7}, "invalid_val_fraction"),
])
def test_bad_training_params_raise_with_a_code(params, code, scenes):
    with pytest.raises(ValueError, match=rf"^\[{code}\] "):
        train(scenes, DictCache(), **params)


# --- serving -------------------------------------------------------------------------------------------


def test_held_out_scenes_reach_bleu4_and_beam_finds_likelier_captions(captioner, held_out):
    scenes, images = held_out
    beam_out = [out["captions"][0] for out in caption_all(captioner, images, beam_width=3)]
    greedy_out = [out["captions"][0] for out in caption_all(captioner, images, beam_width=1)]
    beam_bleu = bleu4([caption["text"] for caption in beam_out], scenes)
    greedy_bleu = bleu4([caption["text"] for caption in greedy_out], scenes)
    assert beam_bleu >= 0.6 and greedy_bleu >= 0.6, (beam_bleu, greedy_bleu)
    # What beam search is for: a caption at least as likely as greedy decoding's, for every image
    for beam, greedy in zip(beam_out, greedy_out, strict=True):
        assert beam["log_prob"] >= greedy["log_prob"] - 1e-4, (beam, greedy)
    assert sum(b["log_prob"] for b in beam_out) > sum(g["log_prob"] for g in greedy_out)


def test_captions_name_the_right_colour_and_shape(captioner, held_out):
    scenes, images = held_out
    outputs = caption_all(captioner, images)
    right = 0
    for scene, out in zip(scenes, outputs, strict=True):
        words = out["captions"][0]["tokens"]
        named_colours = [w for w in words if w in COLOURS]
        named_shapes = [w for w in words if w in SHAPES]
        right += named_colours == [scene.colour] and named_shapes == [scene.shape]
    assert right >= 0.8 * len(scenes), f"{right} of {len(scenes)}"


def test_n_best_captions_are_distinct_and_sorted_by_score(captioner, held_out):
    _, images = held_out
    for alpha in (0.0, 1.0):
        for out in caption_all(captioner, images[:10], beam_width=5, num_captions=4, length_penalty=alpha):
            captions = out["captions"]
            assert len(captions) == 4
            assert len({c["text"] for c in captions}) == 4
            scores = [c["score"] for c in captions]
            assert scores == sorted(scores, reverse=True)
            for c in captions:
                assert c["log_prob"] < 0 and c["text"] == " ".join(c["tokens"])
                assert c["score"] == pytest.approx(c["log_prob"] / (len(c["tokens"]) + 1) ** alpha, abs=1e-5)


def test_greedy_is_the_argmax_path_and_log_probs_are_the_models(captioner, held_out):
    _, images = held_out
    out = caption_all(captioner, images[:3], beam_width=1)
    model = captioner._model
    assert model is not None
    index = model.vocabulary.index
    for image, result in zip(images[:3], out, strict=True):
        from services.captioner.predictor import encode_images

        features = encode_images(captioner._encoder, [image])  # type: ignore[arg-type]
        with torch.inference_mode():
            context, state = model.decoder.start(features)
            token, words, total = START, [], 0.0
            while True:
                log_probs, state = model.decoder.step(torch.tensor([token]), state, context)
                allowed = log_probs[0].clone()
                allowed[[0, 1, 3]] = -float("inf")
                if not words:
                    allowed[END] = -float("inf")  # min_length 1
                token = int(allowed.argmax())
                total += float(log_probs[0, token])
                if token == END:
                    break
                words.append(model.vocabulary.words[token])
        caption = result["captions"][0]
        assert caption["tokens"] == words
        assert caption["log_prob"] == pytest.approx(total, abs=1e-4)
        assert all(w in index for w in words)


def test_a_batch_gives_what_each_image_gives_alone(captioner, held_out):
    _, images = held_out
    params = [{"beam_width": 3}, {"beam_width": 1}, {"beam_width": 5, "num_captions": 2}, {"max_length": 3}]
    requests = [PredictRequest(images=[images[i]], params=params[i % 4]) for i in range(16)]
    together = captioner.predict(requests)
    alone = [captioner.predict([request])[0] for request in requests]
    for a, b in zip(together, alone, strict=True):
        assert [c["text"] for c in a["captions"]] == [c["text"] for c in b["captions"]]
        assert [c["log_prob"] for c in a["captions"]] == pytest.approx([c["log_prob"] for c in b["captions"]], abs=1e-4)


def test_length_and_repetition_controls(captioner, held_out):
    _, images = held_out
    for out in caption_all(captioner, images[:8], max_length=3, beam_width=3, num_captions=3):
        assert all(1 <= len(c["tokens"]) <= 3 for c in out["captions"])
    for out in caption_all(captioner, images[:8], min_length=9):
        assert len(out["captions"][0]["tokens"]) >= 9
    # "a red circle on a white background" repeats "a": no unigram may repeat
    for out in caption_all(captioner, images[:8], no_repeat_ngram_size=1, beam_width=3, num_captions=3):
        for c in out["captions"]:
            assert len(set(c["tokens"])) == len(c["tokens"]), c["text"]
    plain = [o["captions"][0]["text"] for o in caption_all(captioner, images[:8])]
    assert any(text.split().count("a") > 1 for text in plain)  # so the control above did something


@pytest.mark.parametrize(("params", "code"), [
    ({"beam_width": 0}, "invalid_beam_width"),
    ({"beam_width": 21}, "invalid_beam_width"),
    ({"beam_width": 3, "num_captions": 4}, "num_captions_over_beam_width"),
    ({"num_captions": 0}, "invalid_num_captions"),
    ({"max_length": 500}, "max_length_too_long"),
    ({"max_length": 0}, "invalid_max_length"),
    ({"max_length": 4, "min_length": 5}, "invalid_min_length"),
    ({"length_penalty": -1}, "invalid_length_penalty"),
    ({"no_repeat_ngram_size": 11}, "invalid_no_repeat_ngram_size"),
    ({"temperature": 0.7}, "sampling_unsupported"),
])
def test_bad_serving_params_raise_with_a_code(captioner, held_out, params, code):
    _, images = held_out
    with pytest.raises(ValueError, match=rf"^\[{code}\] "):
        captioner.predict([PredictRequest(images=[images[0]], params=params)])


def test_absent_params_take_the_defaults(captioner, held_out):
    _, images = held_out
    explicit = {"beam_width": 3, "num_captions": 1, "length_penalty": 0.0, "min_length": 1,
                "max_length": captioner.max_words, "no_repeat_ngram_size": 0, "temperature": None}
    assert caption_all(captioner, images[:4]) == caption_all(captioner, images[:4], **explicit)


def test_the_artifact_round_trips(trained, captioner):
    result, _ = trained
    payload = torch.load(io.BytesIO(result.artifact), weights_only=True)
    assert payload["format"] == "percept.lstm-captioner" and payload["format_version"] == 2
    assert payload["encoder"]["kind"] == "efficientnet-lite0" and payload["encoder"]["torchscript"] is None
    assert payload["vocabulary"] == result.card["vocabulary"]
    assert payload["config"]["architecture"] == "merge"
    assert payload["config"]["max_length"] == result.metrics["max_length"] + 2
    assert payload["encoder"]["weights_sha256"] == result.card["encoder_weights_sha256"]
    info = captioner.setup()
    assert info.sha256 == hashlib.sha256(result.artifact).hexdigest()
    assert (info.name, info.version, info.device) == ("scenes", "1", "cpu")
    assert "torch" in info.libraries
    assert captioner.max_words == result.metrics["max_length"]
    with pytest.raises(ValueError, match="not a captioner artifact"):
        LSTMCaptioner(artifact=b"garbage", name="x", version="1", device="cpu").setup()


def test_one_image_per_request(captioner, held_out):
    _, images = held_out
    with pytest.raises(ValueError, match="exactly one image"):
        captioner.predict([PredictRequest(images=images[:2], params={})])
    assert captioner.predict([]) == []


def test_scenes_are_deterministic_and_flickr8k_shaped():
    import zipfile

    first, second = scenes_zip(12, seed=3, split=(8, 2, 2)), scenes_zip(12, seed=3, split=(8, 2, 2))
    assert first == second
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert {"Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt",
            "Flickr_8k.testImages.txt"} <= set(names)
    assert sum(name.startswith("Flicker8k_Dataset/") and name.endswith(".jpg") for name in names) == 12
    tokens = zipfile.ZipFile(io.BytesIO(first)).read("Flickr8k.token.txt").decode().splitlines()
    assert len(tokens) == 60 and all(re.match(r"^\d+_[0-9a-f]+\.jpg#[0-4]\t[A-Z].* \.$", line) for line in tokens)


def test_a_version_1_artifact_is_still_read(trained, held_out, captioner):
    result, _ = trained
    payload = torch.load(io.BytesIO(result.artifact), weights_only=True)
    payload["format_version"] = 1
    del payload["encoder"]["kind"], payload["encoder"]["torchscript"]  # what version 1 wrote
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    old = LSTMCaptioner(artifact=buffer.getvalue(), name="scenes", version="0", device="cpu")
    _, images = held_out
    assert caption_all(old, images[:4]) == caption_all(captioner, images[:4])


# --- GloVe word vectors --------------------------------------------------------------------------------

GLOVE_DIM = 8
GLOVE_WORDS = (*COLOURS, *SHAPES)


def glove_vectors(words=GLOVE_WORDS, dim: int = GLOVE_DIM) -> dict[str, list[float]]:
    rng = np.random.default_rng(7)
    return {word: [round(float(v), 4) for v in rng.normal(0, 0.5, dim)] for word in words}


def glove_text(vectors: dict[str, list[float]]) -> bytes:
    return "".join(f"{word} {' '.join(map(str, vector))}\n" for word, vector in vectors.items()).encode()


def test_glove_vectors_initialise_the_embedding_rows_of_the_words_they_hold():
    vocabulary = Vocabulary.from_captions([["a", "red", "circle", "on", "white"], ["a", "blue", "star"]], 1)
    vectors = glove_vectors(("red", "circle", "Blue", "zebra"))  # "Blue": a cased file's word, lowercased
    found = read_glove(glove_text(vectors), "glove.txt", set(vocabulary.words))
    assert found.dim == GLOVE_DIM and set(found.vectors) == {"red", "circle", "blue"}
    config = DecoderConfig("merge", len(vocabulary), 8, feature_dim=16, embedding_dim=GLOVE_DIM, hidden_size=16)
    torch.manual_seed(0)
    decoder = CaptionDecoder(config)
    torch.manual_seed(0)
    untouched = CaptionDecoder(config).embedding.weight.detach().clone()
    assert initialise_embeddings(decoder, vocabulary, found.vectors) == 3
    weight = decoder.embedding.weight
    index = vocabulary.index
    for word, key in (("red", "red"), ("circle", "circle"), ("blue", "Blue")):
        assert weight[index[word]].tolist() == pytest.approx(vectors[key], abs=1e-6)
    for word in ("a", "on", "white", "star", "<unk>", "startseq"):  # not in the file: random as before
        assert torch.equal(weight[index[word]], untouched[index[word]])
    assert not weight[0].any()  # <pad>
    assert weight.requires_grad  # still trained


def test_training_with_glove_vectors_takes_their_dimension_and_counts_the_words(scenes, cache):
    vectors = glove_vectors((*GLOVE_WORDS, "zebra"))
    zip_bytes = add_files(scenes, {"vectors/glove.8d.txt": glove_text(vectors)})
    result = train(zip_bytes, cache, epochs=2, glove="vectors/glove.8d.txt", embedding_dim=128)
    glove = result.metrics["glove"]
    assert glove == result.output["glove"] == result.card["glove"]
    assert glove == {"file": "vectors/glove.8d.txt", "dim": GLOVE_DIM, "words_found": len(GLOVE_WORDS),
                     "vocabulary_words": result.metrics["vocabulary_size"] - 4}
    assert result.card["config"]["embedding_dim"] == GLOVE_DIM  # the file's D, not the 128 asked for
    assert result.output["dataset"]["feature_cache"]["misses"] == 0  # the same photos: the cache's features
    model = load_caption_model(result.artifact, "cpu", result.card["encoder_weights_sha256"])
    assert model.config.embedding_dim == GLOVE_DIM
    # Trained from there: the rows moved off the file's vectors
    red = model.decoder.embedding.weight[model.vocabulary.index["red"]]
    assert not torch.allclose(red, torch.tensor(vectors["red"]))
    assert result.metrics["history"][-1]["val_loss"] < result.metrics["history"][0]["val_loss"]


@pytest.mark.parametrize(("text", "line", "problem"), [
    (b"red 0.1 0.2\nblue 0.3\n", 2, "1 values where the first vector has 2"),
    (b"red 0.1 0.2\n\nblue 0.3 0.4 0.5\n", 3, "inconsistent dimensions"),
    (b"red 0.1 abc\n", 1, "must be numbers"),
    (b"red 0.1 0.2\nblue 0.1 nan\n", 2, "must be finite"),
    (b"red\n", 1, "expected `word v1 v2 ... vD`"),
    (b"red 0.1 0.2\nbl\xffe 0.3 0.4\n", 2, "is not UTF-8"),
])
def test_bad_glove_files_name_the_line(text, line, problem):
    with pytest.raises(ValueError, match=rf"^\[invalid_glove_file\] 'g.txt', line {line}: .*{re.escape(problem)}"):
        read_glove(text, "g.txt", {"red", "blue"})
    with pytest.raises(ValueError, match=r"^\[invalid_glove_file\] 'g.txt' holds no word vectors"):
        read_glove(b"\n\n", "g.txt", {"red"})


def test_a_bad_or_missing_glove_file_fails_the_job_with_its_code(scenes):
    with pytest.raises(ValueError, match=r"^\[glove_not_found\] .*'glove.txt'"):
        train(scenes, DictCache(), glove="glove.txt")
    bad = add_files(scenes, {"glove.txt": b"red 0.1 0.2\nblue 0.3\n"})
    with pytest.raises(ValueError, match=r"^\[invalid_glove_file\] 'glove.txt', line 2: "):
        train(bad, DictCache(), glove="glove.txt")
