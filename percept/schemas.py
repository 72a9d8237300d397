"""Request and response schemas of the public API (API.md): the gateway validates and answers with them, and the
Python client (percept.client) parses its answers into them, so the two cannot drift apart. ORM classes live in
percept.db.models (imported here for type checking only: the client never loads SQLAlchemy's models)."""

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from percept.db.models import Generation, Image, Job, Webhook, WebhookDelivery


class ErrorBody(BaseModel):
    code: str = Field(examples=["image_too_large"])
    message: str
    details: dict[str, Any] = {}


class ErrorOut(BaseModel):
    error: ErrorBody


# The `responses` of a route in the OpenAPI schema: status -> {"model": ErrorOut}.
Responses = dict[int | str, dict[str, Any]]


ImageKind = Literal["uploaded", "generated", "card"]


class ImageOut(BaseModel):
    id: str
    sha256: str
    width: int
    height: int
    format: str
    bytes: int
    created_at: datetime
    kind: ImageKind = Field("uploaded", description="`uploaded`; `generated` (diffusion, memes); `card` (a "
                                                    "grid's contact sheet)")
    source_job_id: str | None = Field(None, description="The job that made a generated image")
    generation: dict[str, Any] | None = Field(
        None, description="What made a generated image: prompt, negative prompt, seed, steps, guidance, size, "
                          "scheduler, model name + version + sha256, device, dtype, library versions, job and "
                          "grid ids, subject and style of a grid cell")

    @classmethod
    def of(cls, image: "Image", generation: "Generation | None" = None) -> "ImageOut":
        kind: ImageKind = ("card" if generation is not None and generation.role == "card"
                           else "generated" if image.source_job_id else "uploaded")
        return cls(id=image.id, sha256=image.sha256, width=image.width, height=image.height,
                   format=image.format, bytes=image.bytes, created_at=image.created_at, kind=kind,
                   source_job_id=image.source_job_id, generation=generation.record if generation else None)


class ImagePage(BaseModel):
    data: list[ImageOut]
    next_cursor: str | None


Priority = Literal["high", "normal", "low"]


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: dict[str, Any]
    params: dict[str, Any]
    output: dict[str, Any] | None
    error: dict[str, Any] | None
    provenance: dict[str, Any] | None
    attempts: int
    # The tenant's priority the job was queued at: `high`, `normal` or `low`.
    priority: Priority = "normal"
    # `Cancel-After`: still queued or running at this time, the job is canceled (`deadline_exceeded`).
    deadline_at: datetime | None = None
    parent_id: str | None
    children: list[str] = []

    @classmethod
    def of(cls, job: "Job", children: list[str] | None = None) -> "JobOut":
        return cls(id=job.id, kind=job.kind, status=job.status.value, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at, progress=job.progress,
                   params=job.params, output=job.output, error=job.error, provenance=job.provenance,
                   attempts=job.attempts, priority=cast(Priority, job.priority), deadline_at=job.deadline_at,
                   parent_id=job.parent_id, children=children or [])


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None


class ModelVersionOut(BaseModel):
    version: str
    status: str
    weights_sha256: str | None
    # Where a worker last loaded it: "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)"; null until first served.
    device: str | None = None
    metrics: dict[str, Any]
    card: dict[str, Any]
    created_at: datetime


class ModelOut(BaseModel):
    name: str
    kind: str
    builtin: bool
    latest: str
    versions: list[ModelVersionOut]


class Reusable(BaseModel):
    """A deterministic job's parameters: an equal earlier job's result may answer it (result reuse)."""

    reuse: bool = Field(True, description="false: run the model even if the result of an equal earlier job (same "
                                          "inputs, parameters, model version and seed) could answer at once; as "
                                          "`Prefer: no-reuse`")


class ClassifyParams(Reusable):
    """Parameters of `POST /v1/classify` (multipart form fields or a JSON body)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200,
                              description="Model name, `name` (latest) or `name:version`; default: the "
                                          "ImageNet classifier its service declares")
    top_k: int = Field(5, ge=1, le=1000, description="How many labels to return")
    expected_label: str | None = Field(None, min_length=1, max_length=200,
                                       description="The category the caller expects; gives `match.verdict`")
    unknown_threshold: float | None = Field(None, ge=0.0, le=1.0,
                                            description="Top-1 score under which the answer is `unknown`")


DatasetStatus = Literal["analyzing", "ready", "failed"]


class DatasetOut(BaseModel):
    id: str
    name: str
    sha256: str
    bytes: int
    status: DatasetStatus = Field(description="The status of the dataset's analysis job")
    report: dict[str, Any] | None = Field(
        description="Once ready: counts per class, image sizes, undecodable files, duplicates, warnings")
    error: dict[str, Any] | None = Field(description="Once failed: why the zip cannot be used (`code`, `message`)")
    job_id: str | None = Field(description="The analysis job (GET /v1/jobs/{id})")
    created_at: datetime


MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class TrainClassifierParams(BaseModel):
    """Parameters of `POST /v1/train/classifier`."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="A dataset id from POST /v1/datasets")
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="Model name; each training adds a version")
    balance: Literal["none", "undersample", "oversample", "class_weight"] = "none"
    augment: bool = Field(False, description="Flips, small rotations, crops, colour jitter and noise")
    epochs: int = Field(30, ge=1, le=500, description="At most this many; early stopping on validation loss")
    val_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    target_precision: float = Field(0.9, gt=0.0, le=1.0,
                                    description="The `unknown` threshold is chosen to reach this precision")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    fine_tune: bool = Field(False, description="Also fine-tune the backbone's last block (slower)")


class CaptionParams(Reusable):
    """Parameters of `POST /v1/caption` (multipart form fields or a JSON body). Limits that depend on the
    model (`max_length` over its own) are the worker's to check."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200,
                              description="Captioner, `name` (latest) or `name:version`; default: your newest "
                                          "model of kind `caption`")
    beam_width: int = Field(3, ge=1, le=20, description="Beam search width; 1 is greedy decoding")
    num_captions: int = Field(1, ge=1, le=20, description="How many distinct captions, best first; at most "
                                                          "`beam_width`")
    max_length: int | None = Field(None, ge=1, le=100,
                                   description="Most words per caption; default: the model's own limit")
    min_length: int | None = Field(None, ge=0, le=100,
                                   description="Fewest words per caption (end-of-caption held back until then); "
                                               "at most `max_length`")
    length_penalty: float | None = Field(None, ge=0.0, le=5.0,
                                         description="Beams are ranked by log-prob / length^penalty; 0 ranks by "
                                                     "log-prob alone, higher favours longer captions; default: "
                                                     "the model's own (0 for Percept's LSTM captioners)")
    no_repeat_ngram_size: int = Field(0, ge=0, le=10,
                                      description="No n-gram of this size occurs twice in a caption; 0: no limit")
    temperature: float | None = Field(None, gt=0.0, allow_inf_nan=False,
                                      description="Sample each beam's next word at this temperature (imported "
                                                  "Hugging Face models; Percept's LSTM captioners decode "
                                                  "deterministically and refuse it); default: no sampling")


class TrainCaptionerParams(BaseModel):
    """Parameters of `POST /v1/train/captioner`."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="A caption dataset id from POST /v1/datasets (Flickr8k layout, COCO "
                                     "captions, or captions.jsonl/csv)")
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="Model name; each training adds a version")
    architecture: Literal["merge", "inject"] = Field(
        "merge", description="`merge`: the image joins the LSTM's output; `inject`: the image is the LSTM's "
                             "first input")
    epochs: int = Field(20, ge=1, le=500, description="At most this many; early stopping on validation loss")
    min_word_count: int = Field(2, ge=1, le=1000, description="Rarer words become the unknown token")
    max_length: int | None = Field(None, ge=3, le=100,
                                   description="Longest caption in words; default: from the dataset's captions")
    embedding_dim: int = Field(128, ge=8, le=1024)
    hidden_size: int = Field(256, ge=8, le=2048)
    dropout: float = Field(0.3, ge=0.0, le=0.9)
    batch_size: int = Field(64, ge=1, le=4096)
    learning_rate: float = Field(0.003, gt=0.0, le=1.0)
    beam_width: int = Field(3, ge=1, le=20, description="Beam width of the evaluation (BLEU with beam search)")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5,
                                description="Held out for validation (and again for test) when the dataset "
                                            "has no split files")
    patience: int = Field(5, ge=1, le=500, description="Stop after this many epochs without a lower "
                                                       "validation loss")
    encoder: str = Field(
        "efficientnet-lite0", min_length=1, max_length=1000,
        description="`efficientnet-lite0` (ImageNet, frozen), or the path inside the dataset zip of a TorchScript "
                    "encoder (`torch.jit.save`, e.g. InceptionV3) mapping an N x 3 x 224 x 224 batch, preprocessed "
                    "as EfficientNet-Lite0's (256 resize, 224 centre crop, mean = std = 0.5), to N x F features; "
                    "it is frozen, stored in the model and served with it")
    glove: str | None = Field(
        None, min_length=1, max_length=1000,
        description="The path inside the dataset zip of a GloVe-format text file (`word v1 ... vD` per line): the "
                    "word embeddings of the words it holds start from its vectors and stay trainable; D overrides "
                    "embedding_dim. The job's metrics count the vocabulary words found")


class EnsembleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    members: list[str] = Field(min_length=2, max_length=10,
                               description="Trained classifiers, `name` (latest) or `name:version`")


class ModelImportParams(BaseModel):
    """The form fields of `POST /v1/models/import`, beside the zip (`file`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="Model name; each import adds a version")
    kind: Literal["caption", "image-to-text", "text-to-image"] = Field(
        "caption", description="What the checkpoint does: `caption` (or its synonym `image-to-text`, a Hugging "
                               "Face VisionEncoderDecoderModel or BLIP directory); `text-to-image` (a diffusers "
                               "pipeline directory: Stable Diffusion 1.x/2.x/XL, Turbo, ...)")


class FaceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: Literal["hog", "cnn"] = Field("hog", description="`hog`: fast; `cnn`: accurate, about 8 s on a CPU")


class FaceDetectParams(FaceParams, Reusable):
    expressions: bool = Field(False, description="Also read each face's expression (7 FER2013 classes)")
    landmarks: int = Field(5, description="5- or 68-point landmarks")

    @field_validator("landmarks")
    @classmethod
    def _five_or_68(cls, value: int) -> int:
        if value not in (5, 68):
            raise ValueError("landmarks must be 5 or 68")
        return value


class FaceVerifyParams(FaceParams, Reusable):
    threshold: float = Field(0.6, gt=0.0, le=2.0, description="Distance under which both faces are one person")


class FaceIdentifyParams(FaceParams):
    collection: str = Field(max_length=200, description="Collection name or id")
    top_k: int = Field(1, ge=1, le=20)
    threshold: float | None = Field(None, gt=0.0, le=2.0, description="Default: the collection's threshold")


class EnrollParams(FaceParams):
    pass


class MemeParams(FaceParams):
    top_text: str | None = Field(None, max_length=200)
    bottom_text: str | None = Field(None, max_length=200)
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Picks the caption; random if absent, recorded")


class CollectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    threshold: float = Field(0.6, gt=0.0, le=2.0, description="Face distance under which faces match")


class CollectionOut(BaseModel):
    id: str
    name: str
    threshold: float
    created_at: datetime


class SubjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)


class SubjectOut(BaseModel):
    id: str
    name: str
    collection: str
    faces: int = 0
    created_at: datetime


WebhookEvent = Literal["job.succeeded", "job.failed", "job.canceled", "job.progress"]
# What a webhook gets when it names no events: the job endings (`job.progress` is asked for by name).
JOB_ENDINGS: list[WebhookEvent] = ["job.succeeded", "job.failed", "job.canceled"]
DeliveryStatus = Literal["pending", "delivered", "failed"]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000, description="http(s) URL that receives a signed POST per job event")
    events: list[WebhookEvent] = Field(default_factory=lambda: list(JOB_ENDINGS), min_length=1,
                                       description="Which job events to send: its endings (the default), and "
                                                   "`job.progress` (a running job's progress, e.g. a generation's "
                                                   "steps; at most one delivery pending per job, carrying the job "
                                                   "as it is when sent)")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            parsed = urlsplit(value)
            parsed.port  # noqa: B018 - raises on a port that is not a number in range
            httpx.URL(value)  # what will send it must take it too
        except (ValueError, httpx.InvalidURL):
            raise ValueError("is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    created_at: datetime

    @classmethod
    def of(cls, webhook: "Webhook") -> "WebhookOut":
        return cls(id=webhook.id, url=webhook.url, events=webhook.events, created_at=webhook.created_at)


class WebhookCreatedOut(WebhookOut):
    secret: str = Field(description="Signs every delivery (Percept-Signature); shown only in this answer")


class WebhookDeliveryOut(BaseModel):
    id: int
    job_id: str
    event: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, delivery: "WebhookDelivery") -> "WebhookDeliveryOut":
        return cls(id=delivery.id, job_id=delivery.job_id, event=delivery.event,
                   status=cast(DeliveryStatus, delivery.status),
                   attempts=delivery.attempts,
                   next_attempt_at=delivery.next_attempt_at if delivery.status == "pending" else None,
                   last_status_code=delivery.last_status_code, last_error=delivery.last_error,
                   created_at=delivery.created_at, delivered_at=delivery.delivered_at)


# The diffusers schedulers a generation may name (services/diffusion/pipelines.py maps each to its class; a test
# checks both lists agree). A1111's sampler names, so prompts and settings carry over from the tools people use.
SchedulerName = Literal["DDIM", "DDPM", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M Karras", "DPM2", "DPM2 a",
                        "UniPC", "PNDM", "LMS", "LMS Karras", "DEIS"]
MAX_SEED = 2**32 - 1


class GenerationSettings(BaseModel):
    """What a text-to-image render takes besides its prompt (shared by single generations and grids)."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: str | None = Field(None, max_length=2000, description="What the image should not show")
    model: str | None = Field(None, max_length=200,
                              description="Text-to-image model, `name` (latest) or `name:version`; default: your "
                                          "newest model of kind `text-to-image`")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="Noise seed; random if absent, and always recorded. Image i of a job uses "
                                         "seed + i")
    steps: int = Field(30, ge=1, le=150, description="Denoising steps")
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0, allow_inf_nan=False,
                                  description="Classifier-free guidance (CFG scale); 0 or 1 turns it off")
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8, description="Default: the model's own size")
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8, description="Default: the model's own size")
    scheduler: SchedulerName | None = Field(None, description="Sampler; default: the one the pipeline was saved with")


class GenerateParams(GenerationSettings, Reusable):
    """Parameters of `POST /v1/generate` (a JSON body)."""

    prompt: str = Field(min_length=1, max_length=2000)
    num_images: int = Field(1, ge=1, le=8, description="Images of this prompt, one seed each")


GRID_TEMPLATE = "{subject}, in the style of {style}"


class GridParams(GenerationSettings):
    """Parameters of `POST /v1/generate/grid` (a JSON body): one child job per (subject, style) cell."""

    subjects: list[str] = Field(min_length=1, max_length=32)
    styles: list[str] = Field(min_length=1, max_length=32)
    template: str = Field(GRID_TEMPLATE, min_length=1, max_length=2000,
                          description="Each cell's prompt: `{subject}` and `{style}` are replaced by the cell's")
    images_per_prompt: int = Field(1, ge=1, le=4, description="Images per cell, one seed each")

    @field_validator("subjects", "styles")
    @classmethod
    def _texts(cls, values: list[str]) -> list[str]:
        cleaned = [value.strip() for value in values]
        if any(not value or len(value) > 200 for value in cleaned):
            raise ValueError("each entry must be 1 to 200 characters of text")
        if len(set(cleaned)) < len(cleaned):
            raise ValueError("entries must be different from one another")
        return cleaned

