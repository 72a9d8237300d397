"""Train an LSTM captioner (`merge` or `inject`, see `services.captioner.model`) on a captioned-image dataset,
evaluate it with BLEU, and hand back the artifact `LSTMCaptioner` serves.

    result = CaptionerTrainer().train(TrainingData(archive=zip_bytes, limits=limits, cache=cache),
                                      {"name": "scenes", "epochs": 20}, on_step)

1. The dataset is read with `percept.captions.read_caption_dataset` (Flickr8k, COCO, jsonl or csv layouts).
   Its own train/dev/test splits are used; images in none of them are left out (counted in the output). A
   dataset with no dev split gets one of `val_fraction` of its training images; one with no splits at all
   is split (seeded) into train, dev and test, `val_fraction` each for dev and test.
2. Encoder: the ImageNet EfficientNet-Lite0, frozen, pooled 1280-d features, computed once per image file
   (sha256) and kept in the job's `FeatureCache` (object storage), so retraining on the same photos skips
   the CNN. Photos are decoded as the worker decodes them for serving (no train/serve skew).
   `encoder` may instead name a TorchScript file inside the dataset zip (InceptionV3 or any torch CNN,
   `torch.jit.save`d; see `services.captioner.encoder` for its contract and why TorchScript): it is loaded
   with `torch.jit.load` on the training device, frozen, and its (N, F) features replace the 1280-d ones.
   Its cache keys carry the file's sha256, so two encoders never share features; its bytes go into the
   artifact, and `LSTMCaptioner` serves with it.
3. Vocabulary: the training captions' words (`percept.captions.tokenize`, as the dataset report counts
   them) seen at least `min_word_count` times; rarer words become <unk>, never generated. `max_length`
   (words, as the serving param counts them; the decoder's sequences are 2 longer, startseq and endseq)
   defaults to the 99th percentile of the training captions' lengths in words.
   `glove` may name a GloVe-format text file inside the dataset zip (`word v1 v2 ... vD` per line, UTF-8):
   the word embeddings then have D dimensions (D overrides `embedding_dim`), the rows of the vocabulary
   words the file holds start from its vectors (a cased file's words also match lowercased), the others
   at random as without it, and all stay trainable; `metrics["glove"]` counts the words found.
4. Decoder: teacher forcing over shuffled mini-batches of (features, caption) pairs, Adam, cross-entropy on
   every next word; validation loss on the dev captions after each epoch, early stopping (`patience`) and
   the best epoch's weights kept; every BLEU_EVERY epochs greedy BLEU-4 on a dev sample. Progress goes to
   `on_step` after every epoch and between batches (at most every PROGRESS_SECONDS): a JobCanceled it
   raises propagates and ends training there.
5. Evaluation on the test split (the dev split when the dataset has no test images): corpus BLEU-1..4 with
   sacrebleu for greedy and beam-`beam_width` decoding, side by side, and a few example captions.

Deterministic on the CPU: the same dataset, params and seed give the same artifact bytes (initialisation,
batch order and dropout masks come from the seed; the global RNG is restored afterwards).
"""

import hashlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU

from percept.captions import CaptionedImage, read_caption_dataset, read_dataset_file, tokenize
from percept.devices import Device
from percept.errors import PerceptError
from percept.imaging import decode_rgb
from percept.predictor import FeatureCache, StepCallback, TrainingData, TrainingResult, report_step
from percept.version import library_versions
from services.captioner.decoding import DecodingOptions
from services.captioner.encoder import (
    ENCODER_NAME,
    PREPROCESSING,
    TORCHSCRIPT_ENCODER,
    FrozenEncoder,
    frozen_encoder,
    scripted_encoder,
)
from services.captioner.model import (
    ARCHITECTURES,
    PAD,
    RESERVED,
    CaptionDecoder,
    CaptionModel,
    DecoderConfig,
    EncoderSpec,
    Vocabulary,
    initialise_embeddings,
)
from services.captioner.predictor import (
    LIBRARIES,
    Caption,
    LSTMCaptioner,
    encode_images,
    generate_captions,
    model_device,
)

PREDICTOR = "services.captioner.predictor:LSTMCaptioner"
MODEL_KIND = "caption"
# Cache keys name the encoder, its weights and the preprocessing version: a change to any makes new keys.
FEATURES_VERSION = 1
BLEU_EVERY = 5  # epochs between dev-sample BLEU-4 reports (and the last epoch)
DEV_BLEU_SAMPLE = 100  # images
EXAMPLES = 5  # test images whose captions the output shows
PROGRESS_SECONDS = 2.0  # between-batch progress reports (each is a database write)
MAX_GRAD_NORM = 5.0  # LSTMs occasionally blow up early in training without it
MIN_LOSS_IMPROVEMENT = 1e-4
MAX_WORDS = 100  # as the gateway
MAX_GLOVE_DIM = 4096  # as embedding_dim's limit; GloVe's own files have 50 to 300
MAX_PATH = 1000  # characters of a file path inside the dataset zip


@dataclass(frozen=True)
class CaptionerConfig:
    """How to train; `check_config()` says what is wrong with a bad value."""

    architecture: str = "merge"
    epochs: int = 20  # at most: early stopping may end sooner
    # Words seen fewer times in the training captions become <unk>. 2 (as the gateway's default) drops the
    # words seen once - in real annotations mostly typos (Flickr8k: ~40% of its word types) - and keeps
    # everything a small dataset repeats; for Flickr8k's 30,000 training captions 5 (the dataset report's
    # default, percept.captions.DEFAULT_MIN_WORD_COUNT) or the classic 10 give a tighter vocabulary.
    min_word_count: int = 2
    max_length: int | None = None  # words per caption; None: the training captions' 99th percentile
    # Sizes and rates as the gateway's defaults (TrainCaptionerParams), which it sends when left out.
    embedding_dim: int = 128
    hidden_size: int = 256
    dropout: float = 0.3  # the seed's 0.5 underfits a small dataset in 20 epochs
    batch_size: int = 64  # captions per optimizer step
    learning_rate: float = 3e-3  # Adam
    beam_width: int = 3  # for the evaluation's beam search
    seed: int = 0
    val_fraction: float = 0.1  # of the training images held out for dev (and test) when the dataset has none
    patience: int = 5  # epochs without a lower validation loss before stopping
    encoder: str = ENCODER_NAME  # or the path of a TorchScript encoder file inside the dataset zip
    glove: str | None = None  # the path of a GloVe-format word-vector file inside the dataset zip

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "CaptionerConfig":
        names = {f.name for f in fields(cls)}
        config = cls(**{key: value for key, value in params.items() if key in names and value is not None})
        config.check_config()
        return config

    def check_config(self) -> None:
        """Raise ValueError, naming the field and the accepted values, when a setting is unusable."""
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"[invalid_architecture] architecture must be one of {', '.join(ARCHITECTURES)}; "
                             f"got {self.architecture!r}")
        for name, low, high in (("epochs", 1, 1000), ("min_word_count", 1, 10_000), ("embedding_dim", 8, 4096),
                                ("hidden_size", 8, 4096), ("batch_size", 1, 4096), ("beam_width", 1, 16),
                                ("seed", 0, 2**63 - 1), ("patience", 1, 1000)):
            value = getattr(self, name)
            if not is_integer(value) or not low <= value <= high:
                raise ValueError(f"[invalid_{name}] {name} must be an integer from {low} to {high}; got {value!r}")
        if self.max_length is not None and (not is_integer(self.max_length) or not 1 <= self.max_length <= MAX_WORDS):
            raise ValueError(f"[invalid_max_length] max_length must be a whole number of words from 1 to {MAX_WORDS}, "
                             f"or absent for the training captions' 99th percentile; got {self.max_length!r}")
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"[invalid_dropout] dropout must be a number from 0 to below 1; got {self.dropout!r}")
        if not is_number(self.learning_rate) or not 0 < self.learning_rate <= 1:
            raise ValueError(f"[invalid_learning_rate] learning_rate must be above 0 and at most 1 (try 0.001); "
                             f"got {self.learning_rate!r}")
        if not is_number(self.val_fraction) or not 0 < self.val_fraction < 0.5:
            raise ValueError(f"[invalid_val_fraction] val_fraction must be above 0 and below 0.5; "
                             f"got {self.val_fraction!r}")
        if not isinstance(self.encoder, str) or not self.encoder.strip() or len(self.encoder) > MAX_PATH:
            raise ValueError(f"[invalid_encoder] encoder must be {ENCODER_NAME!r} or the path of a TorchScript file "
                             f"inside the dataset zip; got {self.encoder!r}")
        if self.glove is not None and (not isinstance(self.glove, str) or not self.glove.strip()
                                       or len(self.glove) > MAX_PATH):
            raise ValueError(f"[invalid_glove] glove must be the path of a GloVe-format text file inside the dataset "
                             f"zip, or absent; got {self.glove!r}")


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class Split:
    train: list[CaptionedImage]
    dev: list[CaptionedImage]
    test: list[CaptionedImage]
    unused: int = 0  # images in none of the dataset's splits
    made: str = ""  # which parts the trainer drew itself: "", "dev", "dev+test"


def split_dataset(images: list[CaptionedImage], val_fraction: float, seed: int) -> Split:
    """The dataset's own splits, completed (seeded) where it has none; see the module docstring."""
    rng = np.random.default_rng([seed, 1])
    if all(image.split is None for image in images):
        order = [images[i] for i in rng.permutation(len(images))]
        n_held = max(1, round(len(images) * val_fraction))
        if len(images) < 2 * n_held + 1:
            raise ValueError(f"[dataset_too_small] {len(images)} images cannot be split into train, dev and test")
        return Split(order[2 * n_held:], order[:n_held], order[n_held:2 * n_held], made="dev+test")
    by_split = {part: [image for image in images if image.split == part] for part in ("train", "dev", "test")}
    split = Split(by_split["train"], by_split["dev"], by_split["test"],
                  unused=sum(1 for image in images if image.split is None))
    if not split.train:
        raise ValueError("[no_training_images] the dataset's split files name no training images")
    if not split.dev:
        order = [split.train[i] for i in rng.permutation(len(split.train))]
        n_dev = max(1, round(len(order) * val_fraction))
        if len(order) <= n_dev:
            raise ValueError(f"[dataset_too_small] {len(order)} training images cannot spare a dev split")
        split.dev, split.train, split.made = order[:n_dev], sorted(order[n_dev:], key=lambda i: i.name), "dev"
    return split


def nearest_rank_percentile(values: list[int], q: float) -> int:
    """The dataset report's percentile (nearest rank), so the default max_length matches its p99."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def feature_key(encoder: FrozenEncoder, image_sha256: str) -> str:
    """The packaged encoder's keys as they always were; a TorchScript encoder's carry its file's whole
    sha256 (a user's file, so no shortened digest another upload could be made to match)."""
    if encoder.kind == TORCHSCRIPT_ENCODER:
        return f"{TORCHSCRIPT_ENCODER}-v{FEATURES_VERSION}-{encoder.weights_sha256}/{image_sha256}.npy"
    return f"{ENCODER_NAME}-v{FEATURES_VERSION}-{encoder.weights_sha256[:16]}/{image_sha256}.npy"


def features_to_bytes(vector: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, vector.astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def features_from_bytes(data: bytes, feature_dim: int) -> np.ndarray | None:
    """A cached vector, or None when the bytes are not one (then it is recomputed and overwritten)."""
    try:
        vector = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if vector.shape != (feature_dim,) or vector.dtype != np.float32 or not np.isfinite(vector).all():
        return None
    return vector


@dataclass
class EncodedImages:
    images: list[CaptionedImage]  # those that decoded
    features: np.ndarray  # (len(images), F) float32
    hits: int
    misses: int
    skipped: list[str]  # files that did not decode


def encode_dataset(images: list[CaptionedImage], encoder: FrozenEncoder, cache: FeatureCache | None,
                   max_pixels: int, on_step: StepCallback | None) -> EncodedImages:
    """Pooled features of every image, from the cache where it has them, else from the encoder (then
    cached); counted once per distinct file."""
    digests = [hashlib.sha256(image.data).hexdigest() for image in images]
    vectors: dict[str, np.ndarray] = {}
    hits = 0
    if cache is not None:
        for digest in dict.fromkeys(digests):
            found = cache.get(feature_key(encoder, digest))
            vector = features_from_bytes(found, encoder.feature_dim) if found is not None else None
            if vector is not None:
                vectors[digest] = vector
                hits += 1
    first_of: dict[str, int] = {}
    for i, digest in enumerate(digests):
        if digest not in vectors:
            first_of.setdefault(digest, i)
    missing = list(first_of.values())
    skipped: set[str] = set()
    pictures = []
    for i in missing:
        try:
            pictures.append((i, decode_rgb(images[i].data, max_pixels, at_least=LSTMCaptioner.input_size)))
        except PerceptError:
            skipped.add(digests[i])

    def on_batch(done: int, total: int) -> None:
        report_step(on_step, done, total, {"stage": "features", "cache_hits": hits})

    if pictures:
        computed = encode_images(encoder, [picture for _, picture in pictures], on_batch=on_batch).cpu().numpy()
        for (i, _), vector in zip(pictures, computed, strict=True):
            vectors[digests[i]] = np.ascontiguousarray(vector, dtype=np.float32)
            if cache is not None:
                cache.put(feature_key(encoder, digests[i]), features_to_bytes(vectors[digests[i]]))
    kept = [i for i, digest in enumerate(digests) if digest in vectors]
    matrix = np.stack([vectors[digests[i]] for i in kept]) if kept else np.zeros((0, encoder.feature_dim), np.float32)
    return EncodedImages([images[i] for i in kept], matrix, hits, len(pictures),
                         sorted(images[i].name for i, d in enumerate(digests) if d in skipped))


def training_encoder(name: str, data: TrainingData, device: Device) -> FrozenEncoder:
    """The packaged EfficientNet-Lite0, or the TorchScript encoder file the dataset zip holds at `name`."""
    if name == ENCODER_NAME:
        return frozen_encoder(device)
    assert data.archive is not None
    scripted = read_dataset_file(data.archive, data.limits, name)
    if scripted is None:
        raise ValueError(f"[encoder_not_found] encoder must be {ENCODER_NAME!r} or the path of a TorchScript file "
                         f"inside the dataset zip; the zip holds no {name!r}")
    return scripted_encoder(scripted, device, name)


@dataclass
class WordVectors:
    path: str  # inside the dataset zip
    dim: int
    vectors: dict[str, torch.Tensor]  # only the words asked for (and found), float32


def read_glove(data: bytes, path: str, wanted: set[str]) -> WordVectors:
    """The vectors of the `wanted` words in a GloVe-format file (`word v1 ... vD` per line, blank lines
    skipped; D from the first line). A file word matches exactly, else lowercased (cased files such as
    GloVe 840B); the first occurrence wins. Every line's shape is checked, but only the wanted words' values
    are parsed. ValueError("[invalid_glove_file] ...") naming the line of the first problem."""
    def bad(number: int, problem: str) -> ValueError:
        return ValueError(f"[invalid_glove_file] {path!r}, line {number}: {problem}")

    dim = 0
    exact: dict[str, torch.Tensor] = {}
    lowered: dict[str, torch.Tensor] = {}
    for number, raw in enumerate(io.BytesIO(data), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise bad(number, "is not UTF-8 text") from None
        fields = line.split()
        if not fields:
            continue
        if dim == 0:
            dim = len(fields) - 1
            if not 1 <= dim <= MAX_GLOVE_DIM:
                raise bad(number, f"expected `word v1 v2 ... vD` (D from 1 to {MAX_GLOVE_DIM}); got {len(fields)} "
                                  "fields")
        elif len(fields) - 1 != dim:
            raise bad(number, f"{len(fields) - 1} values where the first vector has {dim} (inconsistent dimensions)")
        word = fields[0]
        target = exact if word in wanted else lowered if word.lower() in wanted else None
        key = word if target is exact else word.lower()
        if target is None or key in target:
            continue
        try:
            vector = torch.tensor([float(value) for value in fields[1:]], dtype=torch.float32)
        except ValueError:
            raise bad(number, f"the values of {word!r} must be numbers") from None
        if not bool(torch.isfinite(vector).all()):
            raise bad(number, f"the values of {word!r} must be finite")
        target[key] = vector
    if dim == 0:
        raise ValueError(f"[invalid_glove_file] {path!r} holds no word vectors")
    return WordVectors(path, dim, {**lowered, **exact})


def training_word_vectors(path: str, data: TrainingData, images: list[CaptionedImage]) -> WordVectors:
    """The GloVe vectors of every word the dataset's captions use (a superset of the vocabulary, so a bad
    file fails before the encoder pass and memory stays bounded by the dataset, not the file)."""
    assert data.archive is not None
    glove = read_dataset_file(data.archive, data.limits, path)
    if glove is None:
        raise ValueError(f"[glove_not_found] glove must be the path of a GloVe-format text file inside the dataset "
                         f"zip; the zip holds no {path!r}")
    words = {word for image in images for caption in image.captions for word in tokenize(caption)}
    return read_glove(glove, path, words - set(RESERVED))


def caption_tensors(images: list[int], captions: list[list[list[str]]], vocabulary: Vocabulary, max_length: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of each caption's image, (C, max_length) token ids padded with <pad>) for the given images."""
    rows, sequences = [], []
    for image in images:
        for words in captions[image]:
            ids = vocabulary.encode(words, max_length)
            rows.append(image)
            sequences.append(ids + [PAD] * (max_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(sequences, dtype=torch.long)


def teacher_forcing_loss(decoder: CaptionDecoder, features: torch.Tensor, sequences: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of every next token (padding ignored), trimmed to the batch's longest caption."""
    length = int((sequences != PAD).sum(dim=1).max())
    sequences = sequences[:, :length]
    logits = decoder(features, sequences[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), sequences[:, 1:].reshape(-1), ignore_index=PAD,
                           reduction=reduction)


def validation_loss(decoder: CaptionDecoder, features: torch.Tensor, rows: torch.Tensor, sequences: torch.Tensor,
                    batch_size: int) -> float:
    """Mean cross-entropy per token over the dev captions (eval mode: no dropout)."""
    decoder.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = sequences[start:start + batch_size]
            total += float(teacher_forcing_loss(decoder, features[rows[start:start + batch_size]], batch, "sum"))
            tokens += int((batch[:, 1:] != PAD).sum())
    return total / max(tokens, 1)


def corpus_bleu(hypotheses: list[str], references: list[list[str]]) -> list[float]:
    """Corpus BLEU-1..4 (cumulative, as captioning papers report them) as fractions 0..1, by sacrebleu.

    Hypotheses and references are already tokenized (`percept.captions.tokenize`, joined by spaces), so
    sacrebleu's own tokenizer is off. Images with fewer references are padded with None, which sacrebleu
    skips."""
    most = max((len(refs) for refs in references), default=0)
    streams: Any = [[refs[j] if j < len(refs) else None for refs in references] for j in range(most)]
    return [round(BLEU(tokenize="none", max_ngram_order=n).corpus_score(hypotheses, streams).score / 100, 6)
            for n in range(1, 5)]


def reference_texts(image: CaptionedImage) -> list[str]:
    return [" ".join(tokenize(caption)) for caption in image.captions]


class CaptionerTrainer:
    """The `train_captioner` job: a captioned-image dataset zip -> an LSTM captioner served by
    `LSTMCaptioner` (see the module docstring). `device` (tests, benchmarks): by default PERCEPT_DEVICE's."""

    def __init__(self, *, device: Device | str | None = None):
        self.device = model_device(device)

    def train(self, data: TrainingData, params: dict[str, Any], on_step: StepCallback) -> TrainingResult:
        started = time.perf_counter()
        # 1. Check inputs and read the dataset
        config = CaptionerConfig.from_params(params)
        name = params.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"[invalid_name] name must be a non-empty model name; got {name!r}")
        if data.archive is None:
            raise ValueError("[no_dataset] training a captioner needs a captioned-image dataset")
        images = read_caption_dataset(data.archive, data.limits)
        split = split_dataset(images, config.val_fraction, config.seed)
        # The extra inputs before the encoder pass, so a bad file fails in seconds
        word_vectors = training_word_vectors(config.glove, data, images) if config.glove is not None else None
        encoder = training_encoder(config.encoder, data, self.device)
        if word_vectors is not None:
            config = replace(config, embedding_dim=word_vectors.dim)

        # 2. Encoder features, from the cache where it has them
        everything = split.train + split.dev + split.test
        encoded = encode_dataset(everything, encoder, data.cache, data.limits.max_image_pixels, on_step)
        position = {image.name: row for row, image in enumerate(encoded.images)}
        train_rows = [position[i.name] for i in split.train if i.name in position]
        dev_rows = [position[i.name] for i in split.dev if i.name in position]
        test_rows = [position[i.name] for i in split.test if i.name in position] or dev_rows
        if not train_rows or not dev_rows:
            raise ValueError("[dataset_too_small] no decodable images are left for training or validation")
        captions = [[tokenize(caption) for caption in image.captions] for image in encoded.images]

        # 3. Vocabulary and caption length, from the training captions only
        train_captions = [words for row in train_rows for words in captions[row]]
        vocabulary = Vocabulary.from_captions(train_captions, config.min_word_count)
        max_words = config.max_length or max(1, nearest_rank_percentile([len(w) for w in train_captions], 99))
        config = replace(config, max_length=max_words)
        max_length = max_words + 2  # the decoder's sequences: startseq and endseq too
        decoder_config = DecoderConfig(config.architecture, len(vocabulary), max_length, encoder.feature_dim,
                                       config.embedding_dim, config.hidden_size, config.dropout)

        # 4. Train the decoder
        features = torch.from_numpy(encoded.features).to(self.device.name)
        train_set = caption_tensors(train_rows, captions, vocabulary, max_length)
        dev_set = caption_tensors(dev_rows, captions, vocabulary, max_length)
        dev_sample = dev_rows[:DEV_BLEU_SAMPLE]
        fit = fit_decoder(decoder_config, config, features, train_set, dev_set, self.device, on_step,
                          dev_bleu=lambda model: corpus_bleu(
                              [c.text for c in greedy_texts(model, features[dev_sample], self.device)],
                              [reference_texts(encoded.images[row]) for row in dev_sample])[3],
                          vocabulary=vocabulary, encoder=EncoderSpec(
                              encoder.kind, encoder.name, encoder.weights_sha256, encoder.feature_dim,
                              encoder.torchscript),
                          word_vectors=word_vectors)
        model = fit.model
        glove = None if word_vectors is None else {
            "file": word_vectors.path, "dim": word_vectors.dim, "words_found": fit.glove_words,
            "vocabulary_words": len(vocabulary) - len(RESERVED)}

        # 5. Evaluate on the test split: greedy and beam side by side
        test_images = [encoded.images[row] for row in test_rows]
        test_features = features[test_rows]
        greedy = greedy_texts(model, test_features, self.device)
        # Beam search as served by default (no length penalty)
        beam = [found[0] for found in generate_captions(
            model, test_features, [DecodingOptions(config.beam_width, 1, max_words)] * len(test_rows), self.device)]
        references = [reference_texts(image) for image in test_images]
        bleu = {"greedy": corpus_bleu([c.text for c in greedy], references),
                "beam": corpus_bleu([c.text for c in beam], references), "beam_width": config.beam_width}
        examples = [{"image": image.name, "references": image.captions, "greedy": g.text, "beam": b.text}
                    for image, g, b in list(zip(test_images, greedy, beam, strict=True))[:EXAMPLES]]

        # 6. The artifact, metrics, card and output
        artifact = model.to_artifact()
        metrics = {"bleu": bleu, "val_loss": fit.best_val_loss, "vocabulary_size": len(vocabulary),
                   "max_length": max_words, "max_tokens": max_length, "epochs_run": len(fit.history),
                   "best_epoch": fit.best_epoch, "glove": glove,
                   "evaluated_on": "test" if split.test and test_rows != dev_rows else "dev",
                   "test_images": len(test_rows), "history": fit.history}
        dataset = {"images": len(encoded.images), "captions": sum(len(c) for c in captions),
                   "train_images": len(train_rows), "dev_images": len(dev_rows), "test_images": len(test_rows),
                   "split_made": split.made or None, "unsplit_images": split.unused,
                   "skipped_files": encoded.skipped,
                   "feature_cache": {"hits": encoded.hits, "misses": encoded.misses}}
        card = {
            "model_type": "lstm-captioner",
            "architecture": config.architecture,
            "encoder": encoder.name,
            "encoder_kind": encoder.kind,
            "encoder_weights": "ImageNet" if encoder.torchscript is None else "user-supplied TorchScript",
            "encoder_weights_sha256": encoder.weights_sha256,
            "encoder_frozen": True,
            "feature_dim": encoder.feature_dim,
            "preprocessing": dict(PREPROCESSING),
            "vocabulary_size": len(vocabulary),
            "vocabulary": list(vocabulary.words),
            "max_length": max_words,
            "glove": glove,
            "config": asdict(config),
            "dataset_sha256": data.dataset.get("sha256"),
            "dataset": {key: value for key, value in dataset.items() if key != "skipped_files"},
            "bleu": bleu,
            "decoding": "greedy and beam search (length_penalty 0, the serving default); BLEU by sacrebleu "
                        "(corpus, cumulative BLEU-1..4, tokenized references)",
            "libraries": library_versions(*LIBRARIES, "sacrebleu"),
            "training_seconds": round(time.perf_counter() - started, 2),
            "device": self.device.description,
        }
        return TrainingResult(metrics=metrics, card=card, artifact=artifact, predictor=PREDICTOR, model_kind=MODEL_KIND,
                              output={"bleu": bleu, "examples": examples, "dataset": dataset, "glove": glove},
                              device=self.device.description)


def greedy_texts(model: CaptionModel, features: torch.Tensor, device: Device) -> list[Caption]:
    """The greedy caption of each image (beam width 1, the model's longest captions allowed)."""
    options = [DecodingOptions(1, 1, model.config.max_words)] * features.shape[0]
    return [found[0] for found in generate_captions(model, features, options, device)]


@dataclass
class FitResult:
    model: CaptionModel
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    glove_words: int = 0  # vocabulary words whose embeddings started from the GloVe file


def fit_decoder(decoder_config: DecoderConfig, config: CaptionerConfig, features: torch.Tensor,
                train_set: tuple[torch.Tensor, torch.Tensor], dev_set: tuple[torch.Tensor, torch.Tensor],
                device: Device, on_step: StepCallback | None, *, dev_bleu: Callable[[CaptionModel], float],
                vocabulary: Vocabulary, encoder: EncoderSpec, word_vectors: WordVectors | None = None
                ) -> FitResult:
    """Teacher forcing with early stopping on the dev loss; the best epoch's weights are kept. With
    `word_vectors`, the embeddings of the words they hold start from them (`initialise_embeddings`).

    The initial weights, the batch order and the dropout masks come from `config.seed`: under `fork_rng`
    the global generator is seeded for this run and restored afterwards, so training leaves the process's
    random state as it found it."""
    train_rows, train_sequences = (t.to(device.name) for t in train_set)
    dev_rows, dev_sequences = (t.to(device.name) for t in dev_set)
    batches = math.ceil(len(train_rows) / config.batch_size)
    total_steps = batches * config.epochs
    fork_devices = [int(device.name.partition(":")[2] or 0)] if device.is_cuda else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        decoder = CaptionDecoder(decoder_config)
        glove_words = initialise_embeddings(decoder, vocabulary, word_vectors.vectors) if word_vectors else 0
        decoder = decoder.to(device.name)
        model = CaptionModel(vocabulary, decoder, encoder)
        optimizer = torch.optim.Adam(decoder.parameters(), lr=config.learning_rate)
        order_generator = torch.Generator().manual_seed(config.seed)
        history: list[dict[str, Any]] = []
        best_loss, best_epoch, best_state = math.inf, 0, snapshot(decoder)
        last_report = time.monotonic()
        for epoch in range(1, config.epochs + 1):
            decoder.train()
            epoch_started = time.perf_counter()
            order = torch.randperm(len(train_rows), generator=order_generator).to(device.name)
            total_loss = 0.0
            for b in range(batches):
                batch = order[b * config.batch_size:(b + 1) * config.batch_size]
                loss = teacher_forcing_loss(decoder, features[train_rows[batch]], train_sequences[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(decoder.parameters(), MAX_GRAD_NORM)
                optimizer.step()
                total_loss += float(loss.detach()) * len(batch)
                if time.monotonic() - last_report >= PROGRESS_SECONDS:  # between batches: a cancel stops here
                    report_step(on_step, (epoch - 1) * batches + b + 1, total_steps,
                                {"stage": "train", "epoch": epoch, "epochs": config.epochs})
                    last_report = time.monotonic()
            val_loss = validation_loss(decoder, features, dev_rows, dev_sequences, config.batch_size)
            record: dict[str, Any] = {"epoch": epoch, "loss": round(total_loss / len(train_rows), 6),
                                      "val_loss": round(val_loss, 6),
                                      "seconds": round(time.perf_counter() - epoch_started, 3)}
            improved = val_loss < best_loss - MIN_LOSS_IMPROVEMENT
            if improved:
                best_loss, best_epoch, best_state = val_loss, epoch, snapshot(decoder)
            stopping = epoch - best_epoch >= config.patience
            if epoch % BLEU_EVERY == 0 or epoch == config.epochs or stopping:
                decoder.eval()
                record["dev_bleu4"] = dev_bleu(model)
            history.append(record)
            report_step(on_step, epoch * batches, total_steps,
                        {"stage": "train", "epochs": config.epochs, **record})
            last_report = time.monotonic()
            if stopping:
                break
    decoder.load_state_dict(best_state)
    decoder.eval().requires_grad_(False)
    return FitResult(model, history, best_epoch, round(best_loss, 6), glove_words)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}
