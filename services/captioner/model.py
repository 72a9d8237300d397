"""The captioner's decoder (word embeddings + an LSTM over the caption so far, conditioned on the encoder's
pooled image features), its vocabulary, and the artifact that carries both.

Two architectures (Tanti, Gatt & Camilleri, "Where to put the image in an image caption generator", 2018):

- `merge` (the seed's Keras model): the LSTM reads only words; its output at each step is added to a
  projection of the image features, and a dense layer then the softmax predict the next word. The image
  never enters the recurrent state.
- `inject` (Show and Tell, Vinyals et al. 2015): the projected image features are the LSTM's first input,
  before `startseq`; the softmax reads the LSTM's output directly.

Both are trained with teacher forcing over whole captions: running the LSTM over `startseq w1 .. wn` and
predicting `w1 .. wn endseq` at once is the same as the seed's one-sample-per-prefix formulation, since the
LSTM is causal, and n times cheaper.

Artifact (`torch.save` of a dict that `torch.load(..., weights_only=True)` reads; format version 2):
    {"format": "percept.lstm-captioner", "format_version": 2,
     "vocabulary": [str, ...],          # index -> word; 0..3 are <pad>, startseq, endseq, <unk>
     "config": {"architecture", "vocabulary_size", "feature_dim", "embedding_dim", "hidden_size",
                "dropout", "max_length"},  # max_length: tokens per caption with both markers
     "decoder": {state-dict key: Tensor},
     "encoder": {"kind": "efficientnet-lite0" | "torchscript",
                 "name": "efficientnet-lite0" | the TorchScript file's path in the dataset zip,
                 "weights_sha256": str,   # the packaged weights file's, or the TorchScript file's
                 "feature_dim": int,      # 1280, or the TorchScript encoder's F
                 "preprocessing": PREPROCESSING,
                 "torchscript": uint8 Tensor of the TorchScript file's bytes | None}}
Version 1 (before user-supplied encoders) is version 2 without `kind` and `torchscript`, always the packaged
EfficientNet-Lite0; it is still read.
"""

import hashlib
import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.captioner.encoder import ENCODER_NAME, FEATURE_DIM, PREPROCESSING, TORCHSCRIPT_ENCODER

ARTIFACT_FORMAT = "percept.lstm-captioner"
ARTIFACT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ARCHITECTURES = ("merge", "inject")
PAD, START, END, UNKNOWN = 0, 1, 2, 3
START_WORD, END_WORD = "startseq", "endseq"
RESERVED = ("<pad>", START_WORD, END_WORD, "<unk>")

# (h, c), each (1, batch, hidden_size)
LSTMState = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Vocabulary:
    """Words by index; the reserved tokens first, then the training captions' words seen at least
    `min_word_count` times, most frequent first (ties alphabetical, so the order is deterministic)."""

    words: tuple[str, ...]

    @classmethod
    def from_captions(cls, captions: Iterable[list[str]], min_word_count: int) -> "Vocabulary":
        counts = Counter(word for words in captions for word in words if word not in RESERVED)
        kept = sorted((word for word, n in counts.items() if n >= min_word_count), key=lambda w: (-counts[w], w))
        return cls((*RESERVED, *kept))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def index(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.words)}

    def encode(self, words: list[str], max_length: int) -> list[int]:
        """`startseq w1 .. wn endseq` as indices, unknown words as <unk>; cut to max_length tokens (a
        caption longer than that loses its last words and its endseq: it is taught as unfinished)."""
        index = self.index
        ids = [START, *(UNKNOWN if w in RESERVED else index.get(w, UNKNOWN) for w in words), END]
        return ids[:max_length]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]


@dataclass(frozen=True)
class DecoderConfig:
    architecture: str
    vocabulary_size: int
    max_length: int  # tokens per caption, startseq and endseq included
    feature_dim: int = FEATURE_DIM
    embedding_dim: int = 256
    hidden_size: int = 256
    dropout: float = 0.5

    @property
    def max_words(self) -> int:
        return self.max_length - 2


class CaptionDecoder(nn.Module):
    """Image features + the caption so far -> the next word's log-probabilities (see the module docstring).

    Incremental decoding: `start(features)` gives the image context and the initial LSTM state, then
    `step(tokens, state, context)` advances every row (image x beam) by one word.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if config.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {config.architecture!r}")
        self.config = config
        self.merge = config.architecture == "merge"
        self.embedding = nn.Embedding(config.vocabulary_size, config.embedding_dim, padding_idx=PAD)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(config.embedding_dim, config.hidden_size, batch_first=True)
        # merge: the image in the LSTM's output space; inject: in the word embeddings' space (a first "word")
        self.image = nn.Linear(config.feature_dim, config.hidden_size if self.merge else config.embedding_dim)
        self.combine = nn.Linear(config.hidden_size, config.hidden_size) if self.merge else None
        self.out = nn.Linear(config.hidden_size, config.vocabulary_size)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: (B, F) features and (B, T) input tokens -> (B, T, V) next-word logits."""
        words = self.dropout(self.embedding(tokens))
        if self.combine is not None:
            image = F.relu(self.image(self.dropout(features)))
            hidden, _ = self.lstm(words)
            return self.out(F.relu(self.combine(self.dropout(hidden) + image[:, None])))
        image = self.image(self.dropout(features))[:, None]
        hidden, _ = self.lstm(torch.cat([image, words], dim=1))
        return self.out(self.dropout(hidden[:, 1:]))

    def start(self, features: torch.Tensor) -> tuple[torch.Tensor, LSTMState]:
        """(B, F) features -> (context, state) before `startseq` is read. merge: the projected image and a
        zero state; inject: the state after reading the image (the context is empty)."""
        batch = features.shape[0]
        if self.combine is not None:
            zeros = features.new_zeros((1, batch, self.config.hidden_size))
            return F.relu(self.image(features)), (zeros, zeros.clone())
        _, state = self.lstm(self.image(features)[:, None])
        return features.new_zeros((batch, 0)), state

    def step(self, tokens: torch.Tensor, state: LSTMState, context: torch.Tensor
             ) -> tuple[torch.Tensor, LSTMState]:
        """(B,) last tokens -> ((B, V) float32 log-probabilities of the next token, the new state)."""
        hidden, state = self.lstm(self.embedding(tokens)[:, None], state)
        hidden = hidden[:, 0]
        if self.combine is not None:
            hidden = F.relu(self.combine(hidden + context))
        return F.log_softmax(self.out(hidden).float(), dim=-1), state


def initialise_embeddings(decoder: CaptionDecoder, vocabulary: Vocabulary, vectors: dict[str, torch.Tensor]) -> int:
    """Copy pretrained word vectors (GloVe) into the embedding rows of the vocabulary words they name;
    the other rows keep their random initialisation, and every row stays trainable. Returns how many
    vocabulary words were initialised. The reserved tokens are never looked up (<pad> stays zero)."""
    dim = decoder.config.embedding_dim
    found = 0
    with torch.no_grad():
        for i, word in enumerate(vocabulary.words):
            vector = vectors.get(word) if i >= len(RESERVED) else None
            if vector is None:
                continue
            if vector.shape != (dim,):
                raise ValueError(f"the vector of {word!r} has {tuple(vector.shape)} values; the embeddings have {dim}")
            decoder.embedding.weight[i] = vector.to(decoder.embedding.weight)
            found += 1
    return found


@dataclass(frozen=True)
class EncoderSpec:
    """The encoder a captioner was trained on, as its artifact records it (module docstring)."""

    kind: str = ENCODER_NAME
    name: str = ENCODER_NAME
    weights_sha256: str = ""
    feature_dim: int = FEATURE_DIM
    torchscript: bytes | None = field(default=None, repr=False)

    def to_payload(self) -> dict[str, Any]:
        scripted = (None if self.torchscript is None
                    else torch.frombuffer(bytearray(self.torchscript), dtype=torch.uint8))
        return {"kind": self.kind, "name": self.name, "weights_sha256": self.weights_sha256,
                "feature_dim": self.feature_dim, "preprocessing": dict(PREPROCESSING), "torchscript": scripted}


@dataclass
class CaptionModel:
    """A trained captioner: its vocabulary, its decoder and the encoder it was trained on."""

    vocabulary: Vocabulary
    decoder: CaptionDecoder
    encoder: EncoderSpec

    @property
    def config(self) -> DecoderConfig:
        return self.decoder.config

    def to_artifact(self) -> bytes:
        """The artifact bytes (module docstring); tensors saved from the CPU, so the bytes do not depend on
        the device that trained it."""
        payload = {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_VERSION,
            "vocabulary": list(self.vocabulary.words),
            "config": asdict(self.config),
            "decoder": {key: value.detach().to("cpu", copy=True) for key, value in self.decoder.state_dict().items()},
            "encoder": self.encoder.to_payload(),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()


def load_caption_model(artifact: bytes, device: str, encoder_weights_sha256: str) -> CaptionModel:
    """Read an artifact written by `CaptionModel.to_artifact` (version 2, or version 1) onto `device`,
    checking that it fits this code and, when it was trained on the packaged EfficientNet-Lite0, that
    `encoder_weights_sha256` (the weights installed here) are the ones it was trained on. A TorchScript
    encoder travels inside the artifact: its bytes are checked against the sha256 recorded beside them.
    ValueError naming what differs."""
    try:
        payload: Any = torch.load(io.BytesIO(artifact), map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for bytes that are not one of its archives
        raise ValueError(f"not a captioner artifact: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"not a captioner artifact (no {ARTIFACT_FORMAT!r} format marker)")
    if payload.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"captioner artifact version {payload.get('format_version')!r} is not supported (this "
                         f"code reads versions {', '.join(map(str, READABLE_VERSIONS))}); retrain the model")
    encoder = read_encoder_spec(payload["encoder"], encoder_weights_sha256)
    vocabulary = Vocabulary(tuple(payload["vocabulary"]))
    config = DecoderConfig(**payload["config"])
    if config.vocabulary_size != len(vocabulary) or vocabulary.words[:len(RESERVED)] != RESERVED:
        raise ValueError("the captioner artifact's vocabulary does not fit its decoder")
    if config.feature_dim != encoder.feature_dim:
        raise ValueError(f"the captioner artifact's decoder reads {config.feature_dim} features; its encoder "
                         f"gives {encoder.feature_dim}")
    decoder = CaptionDecoder(config).to(device)
    decoder.load_state_dict(payload["decoder"])
    return CaptionModel(vocabulary, decoder.eval().requires_grad_(False), encoder)


def read_encoder_spec(stored: dict[str, Any], packaged_weights_sha256: str) -> EncoderSpec:
    """The artifact's encoder record, checked (see `load_caption_model`)."""
    if stored["preprocessing"] != PREPROCESSING:
        raise ValueError(f"the model was trained with preprocessing {stored['preprocessing']}, this service "
                         f"applies {PREPROCESSING}; retrain the model")
    kind = stored.get("kind", ENCODER_NAME)  # version 1 knew only the packaged encoder
    if kind == TORCHSCRIPT_ENCODER:
        scripted = stored.get("torchscript")
        if not isinstance(scripted, torch.Tensor) or scripted.dtype != torch.uint8:
            raise ValueError("the captioner artifact names a TorchScript encoder but does not hold it")
        data = scripted.cpu().numpy().tobytes()
        if hashlib.sha256(data).hexdigest() != stored["weights_sha256"]:
            raise ValueError("the captioner artifact's TorchScript encoder does not match its recorded sha256")
        return EncoderSpec(kind, stored["name"], stored["weights_sha256"], int(stored["feature_dim"]), data)
    if kind != ENCODER_NAME or stored["name"] != ENCODER_NAME or stored["weights_sha256"] != packaged_weights_sha256:
        raise ValueError(f"the model was trained on encoder {stored['name']} with weights "
                         f"{stored['weights_sha256']}; this service has {ENCODER_NAME} with "
                         f"{packaged_weights_sha256}; retrain the model")
    return EncoderSpec(ENCODER_NAME, ENCODER_NAME, packaged_weights_sha256, int(stored["feature_dim"]))
