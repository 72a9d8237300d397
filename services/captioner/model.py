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

Artifact (`torch.save` of a dict that `torch.load(..., weights_only=True)` reads; format version 1):
    {"format": "percept.lstm-captioner", "format_version": 1,
     "vocabulary": [str, ...],          # index -> word; 0..3 are <pad>, startseq, endseq, <unk>
     "config": {"architecture", "vocabulary_size", "feature_dim", "embedding_dim", "hidden_size",
                "dropout", "max_length"},  # max_length: tokens per caption with both markers
     "decoder": {state-dict key: Tensor},
     "encoder": {"name": "efficientnet-lite0", "weights_sha256": str, "feature_dim": 1280,
                 "preprocessing": PREPROCESSING}}
"""

import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.captioner.encoder import ENCODER_NAME, FEATURE_DIM, PREPROCESSING

ARTIFACT_FORMAT = "percept.lstm-captioner"
ARTIFACT_VERSION = 1
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


@dataclass
class CaptionModel:
    """A trained captioner: its vocabulary, its decoder and the encoder it was trained on."""

    vocabulary: Vocabulary
    decoder: CaptionDecoder
    encoder_weights_sha256: str

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
            "encoder": {"name": ENCODER_NAME, "weights_sha256": self.encoder_weights_sha256,
                        "feature_dim": FEATURE_DIM, "preprocessing": dict(PREPROCESSING)},
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()


def load_caption_model(artifact: bytes, device: str, encoder_weights_sha256: str) -> CaptionModel:
    """Read an artifact written by `CaptionModel.to_artifact` onto `device`, checking that it fits this code
    and the encoder weights installed here (ValueError naming what differs)."""
    try:
        payload: Any = torch.load(io.BytesIO(artifact), map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for bytes that are not one of its archives
        raise ValueError(f"not a captioner artifact: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"not a captioner artifact (no {ARTIFACT_FORMAT!r} format marker)")
    if payload.get("format_version") != ARTIFACT_VERSION:
        raise ValueError(f"captioner artifact version {payload.get('format_version')!r} is not supported (this "
                         f"code reads version {ARTIFACT_VERSION}); retrain the model")
    encoder = payload["encoder"]
    if encoder["name"] != ENCODER_NAME or encoder["weights_sha256"] != encoder_weights_sha256:
        raise ValueError(f"the model was trained on encoder {encoder['name']} with weights "
                         f"{encoder['weights_sha256']}; this service has {ENCODER_NAME} with "
                         f"{encoder_weights_sha256}; retrain the model")
    if encoder["preprocessing"] != PREPROCESSING:
        raise ValueError(f"the model was trained with preprocessing {encoder['preprocessing']}, this service "
                         f"applies {PREPROCESSING}; retrain the model")
    vocabulary = Vocabulary(tuple(payload["vocabulary"]))
    config = DecoderConfig(**payload["config"])
    if config.vocabulary_size != len(vocabulary) or vocabulary.words[:len(RESERVED)] != RESERVED:
        raise ValueError("the captioner artifact's vocabulary does not fit its decoder")
    decoder = CaptionDecoder(config).to(device)
    decoder.load_state_dict(payload["decoder"])
    return CaptionModel(vocabulary, decoder.eval().requires_grad_(False), encoder_weights_sha256)
