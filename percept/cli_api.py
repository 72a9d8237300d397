"""The `percept` commands of an API user, on the typed client (percept.client): classify, caption, faces, generate,
grid, jobs, `models list|show` and `train classifier|captioner`. Long jobs show a progress bar and end with a table
or a summary of the files written; `--json` prints the typed results instead (and nothing else on stdout).

Errors of the API print their status, code and message in red and exit 1; bad usage exits 2. In a batch (classify,
caption, faces), an image the API refuses or whose job fails is one failed row of the table and the others go on
(the command then exits 1); any other error (a wrong key, a missing model, the platform down) stops the command.

`register()` adds the commands to the CLI's apps (percept/cli.py calls it). This module never imports percept.cli:
under `python -m percept.cli` that module is `__main__`, and importing it again would register onto a copy. The
client is imported when a command runs, so `percept gateway` and `percept worker` never load it.
"""

import csv
import json
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from percept.client import Percept
    from percept.schemas import DatasetOut, JobOut, ModelOut

console = Console()
_stderr = Console(stderr=True)
_quiet = Console(quiet=True)

faces_app = typer.Typer(help="Face collections: enroll people, identify them in photos.", no_args_is_help=True)
jobs_app = typer.Typer(help="Your jobs: list, show, watch, cancel.", no_args_is_help=True)

# Example captions `percept train captioner` prints under its BLEU table.
EXAMPLES_SHOWN = 3
# What `classify`, `caption` and `faces` take from a folder (a file named on the command line is always sent).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo"})
# The API's refusals of one image's bytes: that image fails alone in a batch. Any other error would be the same
# for every image of the batch, so it stops the command.
IMAGE_ERRORS = frozenset({"empty_image", "corrupt_image", "unsupported_image", "image_too_large",
                          "image_too_many_pixels"})
# A client's read timeout: above the longest `Prefer: wait` the API holds an answer for (60 s).
CLIENT_TIMEOUT_SECONDS = 120.0
OUT_FORMATS = (".csv", ".jsonl")
HERE = Path(".")
_STATUS_STYLES = {"succeeded": "green", "failed": "red", "canceled": "yellow", "running": "cyan"}

Url = Annotated[str | None, typer.Option(help="API base URL (default PERCEPT_API_URL)")]
Key = Annotated[str | None, typer.Option(help="API key (default PERCEPT_API_KEY, or the dev key)")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the results as JSON, and nothing else")]
Paths = Annotated[list[Path], typer.Argument(metavar="PATH", help="Image files, or folders searched recursively "
                                                                   "for images")]
Concurrency = Annotated[int, typer.Option(min=1, max=32, help="Images in flight at once")]
OutFile = Annotated[Path | None, typer.Option("--out", help="Also write one row per image to FILE.csv or "
                                                            "FILE.jsonl")]
Model = Annotated[str | None, typer.Option(help="Model name, `name` (latest) or `name:version`")]


# --- output, the client and its errors ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Output:
    """Where a command writes: progress, tables and messages to the terminal, or with --json only the JSON on
    stdout (errors then go to stderr)."""

    as_json: bool = False

    @property
    def console(self) -> Console:
        return _quiet if self.as_json else console

    def fail(self, message: str, exit_code: int = 1) -> NoReturn:
        (_stderr if self.as_json else console).print(Text(message, style="red"))
        raise typer.Exit(exit_code)

    def print_json(self, data: Any) -> None:
        print(json.dumps(data, indent=2))


TERMINAL = Output()


@contextmanager
def _checked(out: Output) -> Iterator[None]:
    """The API's errors (an unreachable API included: status 0) as a red `status code: message` and exit 1."""
    from percept.client import JobFailed, PerceptError

    try:
        yield
    except JobFailed as exc:
        out.fail(f"job {exc.job.id} {exc.job.status}: {exc.code}: {exc.message}")
    except PerceptError as exc:
        out.fail(f"{exc.status or ''} {exc.code}: {exc.message}".lstrip())


@contextmanager
def _api_client(url: str | None, key: str | None, out: Output = TERMINAL) -> Iterator["Percept"]:
    """The client for --url/--key (the client's defaults: the settings, or the dev key `percept run` wrote), its
    errors checked."""
    from percept.client import Percept

    try:
        client = Percept(key, url, timeout=CLIENT_TIMEOUT_SECONDS)
    except ValueError:  # no key given, configured or written by `percept run`
        out.fail("No API key: pass --key, set PERCEPT_API_KEY, or run `percept run` once.", 2)
    with _checked(out), client:
        yield client


def _progress(out: Output) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}", markup=False),
                    TimeElapsedColumn(), console=out.console, disable=out.as_json)


def _params(**values: Any) -> dict[str, Any]:
    """The options given, for the API: an option left out is the API's own default."""
    return {name: value for name, value in values.items() if value is not None}


def _dump(job: "JobOut | None") -> dict[str, Any] | None:
    return None if job is None else job.model_dump(mode="json")


def _counted(count: int, thing: str) -> str:
    return f"{count} {thing}{'' if count == 1 else 's'}"


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else str(value)


def _error_text(error: dict[str, Any] | None) -> str:
    error = error or {}
    return f"{error.get('code', '')}: {error.get('message', '')}"


# --- following a job ---------------------------------------------------------------------------------------------

ProgressView = Callable[[dict[str, Any]], dict[str, Any]]


def _followed_job(client: "Percept", job: "JobOut", title: str, total: float | None, describe: ProgressView,
                  out: Output = TERMINAL, *, must_succeed: bool = True) -> "JobOut":
    """Follow the job's events with a progress bar (`describe` turns its `progress` into the bar's update) until
    it ends; return it, or (`must_succeed`) print its error and exit 1 unless it succeeded."""
    from percept.client import JobFailed

    with _progress(out) as progress:
        bar = progress.add_task(title, total=total, stats=job.status)
        described = False  # once the job's progress says something, the bar shows that rather than its status

        def show(job: "JobOut") -> None:
            nonlocal described
            view = describe(job.progress) if job.progress else {}
            described = described or "stats" in view
            progress.update(bar, **(view if described else {**view, "stats": job.status}))

        for seen in client.events(job.id):
            job = seen
            show(job)
        if job.status in ("queued", "running"):  # the stream ended early: wait for the end another way
            try:
                job = client.wait_for_job(job.id)
            except JobFailed as failed:
                job = failed.job
            show(job)
        if job.status == "succeeded":
            whole = progress.tasks[0].total or 1
            progress.update(bar, completed=whole, total=whole)
    if must_succeed and job.status != "succeeded":
        out.fail(f"{title}: {job.status}: {_error_text(job.error)}")
    return job


def _counted_progress(done: dict[str, Any]) -> dict[str, Any]:
    """Any job's `done`/`total`, with its other values as the bar's text."""
    update: dict[str, Any] = {}
    texts = [f"{name} {value}" for name, value in done.items()
             if name not in ("done", "total") and isinstance(value, str | int | float)]
    if isinstance(done.get("done"), int | float) and isinstance(done.get("total"), int | float):
        update = {"completed": done["done"], "total": done["total"]}
        texts.insert(0, f"{done['done']}/{done['total']}")
    return update | ({"stats": "  ".join(texts)} if texts else {})


def _generation_progress(done: dict[str, Any]) -> dict[str, Any]:
    if "step" not in done:  # queued ({"done": 0, "total": 1}), or ended: a success's is {"done": n, "total": n}
        return {"stats": "rendered"} if done.get("done") and done.get("done") == done.get("total") else {}
    stats = f"image {done.get('image', 1)}/{done.get('images', 1)}  step {done.get('step', 0)}/{done.get('steps')}"
    if done.get("eta_seconds") is not None:
        stats += f"  eta {done['eta_seconds']:.1f} s"
    return {"completed": done["done"], "total": done["total"], "stats": stats}


def _classifier_progress(done: dict[str, Any]) -> dict[str, Any]:
    if done.get("phase") == "features":
        return {"stats": f"backbone features {done['done']}/{done['total']}"}
    if "loss" in done:
        return {"completed": done["done"], "total": done["total"],
                "stats": f"loss {done['loss']:.3f}  val_loss {done.get('val_loss', 0):.3f}  "
                         f"val_acc {done.get('val_accuracy', 0):.2f}"}
    return {}


def _captioner_progress(done: dict[str, Any]) -> dict[str, Any]:
    if done.get("stage") == "features":
        return {"stats": f"encoder features {done['done']}/{done['total']}"}
    if done.get("stage") != "train":
        return {}
    # `done`/`total` count batches over all epochs; the bar counts epochs (early stopping ends it sooner).
    update: dict[str, Any] = {"completed": done["epochs"] * done["done"] / max(done["total"], 1),
                              "total": done["epochs"]}
    if "loss" in done:  # an epoch's end
        bleu = f"  dev BLEU-4 {done['dev_bleu4']:.3f}" if "dev_bleu4" in done else ""
        update["stats"] = (f"epoch {done['epoch']}/{done['epochs']}  loss {done['loss']:.3f}  "
                           f"val_loss {done['val_loss']:.3f}{bleu}")
    return update


def _cells_progress(done: dict[str, Any]) -> dict[str, Any]:
    return {**_counted_progress(done), "stats": f"{done.get('done', 0)}/{done.get('total', '?')} cells"}


# How `percept jobs watch` shows a job kind's progress (any other kind: `_counted_progress`).
PROGRESS_VIEWS: dict[str, ProgressView] = {
    "train_classifier": _classifier_progress, "train_captioner": _captioner_progress,
    "generate": _generation_progress, "reproduce_image": _generation_progress, "generate_grid": _cells_progress}


# --- batches of images -------------------------------------------------------------------------------------------

@dataclass
class ImageResult:
    """One image of a batch: its job (None when the API refused the image), and its error when it failed."""

    path: Path
    job: "JobOut | None"
    error: dict[str, Any] | None

    @property
    def status(self) -> str:
        return self.job.status if self.job is not None else "refused"

    def as_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "job": _dump(self.job), "error": self.error}


def _image_paths(paths: Sequence[Path], out: Output) -> list[Path]:
    """The files named, and the images under the folders named (sorted); exit 2 when there is none."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            out.fail(f"{path} does not exist.", 2)
    if not found:
        out.fail(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, paths))}.", 2)
    return list(dict.fromkeys(found))


def _checked_out_file(out_file: Path | None, out: Output) -> None:
    if out_file is not None and out_file.suffix.lower() not in OUT_FORMATS:
        out.fail(f"--out {out_file}: write a .csv or a .jsonl file.", 2)


def _batch(paths: list[Path], submit: Callable[[Path], "JobOut"], title: str, concurrency: int,
           out: Output) -> list[ImageResult]:
    """Submit each image and wait for its job, `concurrency` at a time, with a progress bar over the images."""
    from percept.client import JobFailed, PerceptError

    def one(path: Path) -> ImageResult:
        try:
            job = submit(path)
        except JobFailed as exc:
            return ImageResult(path, exc.job, exc.job.error or {"code": exc.code, "message": exc.message})
        except PerceptError as exc:
            if exc.code not in IMAGE_ERRORS:
                raise
            return ImageResult(path, None, {"code": exc.code, "message": exc.message})
        return ImageResult(path, job, None if job.status == "succeeded" else job.error or {"code": job.status})

    results: list[ImageResult | None] = [None] * len(paths)
    failed = 0
    with _progress(out) as progress, ThreadPoolExecutor(concurrency) as pool:
        bar = progress.add_task(title, total=len(paths), stats=f"0/{len(paths)}")
        futures = {pool.submit(one, path): index for index, path in enumerate(paths)}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                result = results[futures[future]] = future.result()
                failed += result.error is not None
                progress.update(bar, advance=1, stats=f"{done}/{len(paths)}" + (f"  {failed} failed" if failed
                                                                                 else ""))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # the images not yet sent are not sent
            raise
    return [result for result in results if result is not None]


def _write_rows(out_file: Path | None, rows: list[dict[str, Any]]) -> None:
    if out_file is None or not rows:
        return
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("w", newline="") as written:
        if out_file.suffix.lower() == ".csv":
            writer = csv.DictWriter(written, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            written.writelines(json.dumps(row) + "\n" for row in rows)


def _ended_batch(results: list[ImageResult], out: Output) -> None:
    """Print the batch's results as JSON (--json), then exit 1 when any of them failed."""
    if out.as_json:
        out.print_json([result.as_json() for result in results])
    failed = [result for result in results if result.error is not None]
    if failed:
        out.fail(f"{len(failed)} of {_counted(len(results), 'image')} failed.")


# --- classify and caption ----------------------------------------------------------------------------------------

def _answered_batch(results: list[ImageResult], columns: tuple[str, str],
                    answer: Callable[[dict[str, Any]], dict[str, Any]], out_file: Path | None, out: Output) -> None:
    """A batch whose jobs each give one answer (`columns`: its text and its number, which `answer` takes from a
    job's output): a row per image to --out (path, job_id, status, the answer, error), then the table, or JSON."""
    text, number = columns
    rows = []
    for result in results:
        given = answer(result.job.output or {}) if result.job and not result.error else {}
        rows.append({"path": str(result.path), "job_id": result.job.id if result.job else "",
                     "status": result.status, text: given.get(text, ""), number: given.get(number, ""),
                     "error": (result.error or {}).get("code", "")})
    _write_rows(out_file, rows)
    table = Table(title=_counted(len(results), "image") + (f" -> {out_file}" if out_file else ""))
    for column in ("image", text, number):
        table.add_column(column, justify="right" if column == number else "left")
    for result, row in zip(results, rows, strict=True):
        table.add_row(row["path"], *((row[text], _number(row[number])) if not result.error else
                                     (Text(_error_text(result.error), style="red"), "")))
    out.console.print(table)
    _ended_batch(results, out)


def classify(
    paths: Paths,
    model: Model = None,
    top_k: Annotated[int | None, typer.Option(min=1, max=1000, help="Labels per image (default 5)")] = None,
    concurrency: Concurrency = 4,
    out_file: OutFile = None,
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Classify images (files, or folders searched recursively): a progress bar, then each image's top label."""
    out = Output(as_json)
    _checked_out_file(out_file, out)
    images = _image_paths(paths, out)
    params = _params(model=model, top_k=top_k)
    with _api_client(url, key, out) as client:
        results = _batch(images, lambda path: client.classify(path, wait=True, **params),
                         f"classifying {_counted(len(images), 'image')}", concurrency, out)
    _answered_batch(results, ("label", "score"), lambda output: (output.get("labels") or [{}])[0], out_file, out)


def caption(
    paths: Paths,
    model: Model = None,
    beam_width: Annotated[int | None, typer.Option(min=1, max=20, help="Beam search width; 1 is greedy "
                                                                       "(default 3)")] = None,
    concurrency: Concurrency = 4,
    out_file: OutFile = None,
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Caption images (files, or folders searched recursively) with your captioner: a progress bar, then each
    image's caption and its log-probability."""
    out = Output(as_json)
    _checked_out_file(out_file, out)
    images = _image_paths(paths, out)
    params = _params(model=model, beam_width=beam_width)
    with _api_client(url, key, out) as client:
        results = _batch(images, lambda path: client.caption(path, wait=True, **params),
                         f"captioning {_counted(len(images), 'image')}", concurrency, out)

    def best(output: dict[str, Any]) -> dict[str, Any]:
        first = (output.get("captions") or [{}])[0]
        return {"caption": first.get("text", ""), "log_prob": first.get("log_prob", "")}

    _answered_batch(results, ("caption", "log_prob"), best, out_file, out)


# --- faces -------------------------------------------------------------------------------------------------------

def _created(create: Callable[[], object], what: str, out: Output) -> None:
    """Create the collection or subject; a 409 means it exists already, which is as good."""
    from percept.client import Conflict

    try:
        create()
        out.console.print(f"{what}: created", highlight=False)
    except Conflict:
        out.console.print(f"{what}: exists", style="dim", highlight=False)


def _box(box: list[int] | None) -> str:
    return "" if not box else f"{box[0]},{box[1]} {box[2]}x{box[3]}"


@faces_app.command("enroll")
def enroll_faces(
    collection: Annotated[str, typer.Argument(metavar="COLLECTION", help="Collection name (created if missing)")],
    subject: Annotated[str, typer.Argument(metavar="SUBJECT", help="The person's name in it (created if missing)")],
    paths: Paths,
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Enroll one face per image as SUBJECT of COLLECTION: a progress bar over the faces, then what each gave."""
    out = Output(as_json)
    images = _image_paths(paths, out)
    with _api_client(url, key, out) as client:
        _created(lambda: client.create_collection(collection), f"collection {collection}", out)
        _created(lambda: client.create_subject(collection, subject), f"subject {subject}", out)
        # One at a time: each enrollment's warnings see the faces enrolled before it.
        results = _batch(images, lambda path: client.enroll_face(collection, subject, path, wait=True),
                         f"enrolling {_counted(len(images), 'face')}", 1, out)
    table = Table(title=f"{collection} / {subject}")
    for column in ("image", "status", "face", "faces enrolled", "notes"):
        table.add_column(column)
    for result in results:
        output = (result.job.output or {}) if result.job and not result.error else {}
        notes = Text(_error_text(result.error), style="red") if result.error else Text(
            "; ".join(warning.get("message", warning.get("code", "")) for warning in output.get("warnings", [])),
            style="yellow")
        table.add_row(str(result.path), result.status, _box((output.get("face") or {}).get("box")),
                      str(output.get("faces_enrolled", "")), notes)
    out.console.print(table)
    _ended_batch(results, out)


@faces_app.command("identify")
def identify_faces(
    collection: Annotated[str, typer.Argument(metavar="COLLECTION", help="Collection name or id")],
    paths: Paths,
    concurrency: Concurrency = 4,
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Who is in each image: every face found, its box, and the collection's closest subject."""
    out = Output(as_json)
    images = _image_paths(paths, out)
    with _api_client(url, key, out) as client:
        results = _batch(images, lambda path: client.identify_faces(path, collection, wait=True),
                         f"identifying faces in {_counted(len(images), 'image')}", concurrency, out)
    table = Table(title=f"faces in {collection}")
    for column in ("image", "face", "best match", "distance"):
        table.add_column(column, justify="right" if column == "distance" else "left")
    for result in results:
        if result.error or result.job is None:
            table.add_row(str(result.path), Text(_error_text(result.error), style="red"), "", "")
            continue
        faces = (result.job.output or {}).get("faces", [])
        if not faces:
            table.add_row(str(result.path), Text("no face", style="dim"), "", "")
        for face in faces:
            best = (face.get("matches") or [None])[0]
            table.add_row(str(result.path), _box(face.get("box")),
                          best["subject"] if best else Text("nobody (none within the threshold)", style="dim"),
                          f"{best['distance']:.3f}" if best else "")
    out.console.print(table)
    _ended_batch(results, out)


# --- text-to-image -----------------------------------------------------------------------------------------------

def _file_name(text: str) -> str:
    """A subject or a style as a file name: runs of anything but letters, digits, `.` and `_` become one `-`."""
    return re.sub(r"[^\w.]+", "-", text).strip("-.") or "_"


def _listed(value: str, option: str, out: Output) -> list[str]:
    """A comma-separated option; exit 2 when it is empty or two entries would share a file name."""
    values = [entry.strip() for entry in value.split(",") if entry.strip()]
    if not values:
        out.fail(f"{option}: give one or more, separated by commas.", 2)
    names = [_file_name(entry) for entry in values]
    if len(set(names)) < len(names):
        out.fail(f"{option}: {', '.join(values)} would share file names ({', '.join(names)}); name them apart.", 2)
    return values


def _downloaded(client: "Percept", downloads: list[tuple[str, Path]], out: Output) -> None:
    with _progress(out) as progress:
        bar = progress.add_task(f"downloading {_counted(len(downloads), 'image')}", total=len(downloads), stats="")
        for image_id, path in downloads:
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_image(image_id, path)
            progress.update(bar, advance=1, stats=str(path))


Steps = Annotated[int | None, typer.Option(min=1, max=150, help="Denoising steps (default 30)")]
Width = Annotated[int | None, typer.Option(min=64, max=2048, help="Multiple of 8 (default: the model's)")]
Height = Annotated[int | None, typer.Option(min=64, max=2048, help="Multiple of 8 (default: the model's)")]
Scheduler = Annotated[str | None, typer.Option(help="Sampler: DDIM, Euler, Euler a, DPM++ 2M, UniPC, ... "
                                                    "(default: the pipeline's)")]
Guidance = Annotated[float | None, typer.Option(min=0.0, max=30.0, help="CFG scale (default 7.5)")]
NegativePrompt = Annotated[str | None, typer.Option(help="What the images should not show")]


@dataclass
class _Generation:
    """A run's rendering settings as the API takes them."""

    model: str | None
    steps: int | None
    width: int | None
    height: int | None
    scheduler: str | None
    guidance_scale: float | None
    negative_prompt: str | None

    def params(self) -> dict[str, Any]:
        return _params(**asdict(self))


def generate(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="What to draw")],
    seed: Annotated[int | None, typer.Option(min=0, help="Noise seed (random if absent, always recorded); "
                                                         "image i takes seed + i")] = None,
    num_images: Annotated[int, typer.Option(min=1, max=8, help="Images of this prompt")] = 1,
    steps: Steps = None,
    width: Width = None,
    height: Height = None,
    scheduler: Scheduler = None,
    guidance_scale: Guidance = None,
    negative_prompt: NegativePrompt = None,
    model: Model = None,
    out_dir: Annotated[Path, typer.Option("--out", file_okay=False, help="Folder the PNGs are written to")] = HERE,
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Render PROMPT with your text-to-image model: a progress bar per denoising step, then the PNGs written to
    --out (named by image id) with their seeds."""
    out = Output(as_json)
    settings = _Generation(model, steps, width, height, scheduler, guidance_scale, negative_prompt)
    with _api_client(url, key, out) as client:
        job = client.generate(prompt, **settings.params(), **_params(seed=seed, num_images=num_images))
        job = _followed_job(client, job, f"generating {_counted(num_images, 'image')}",
                            None, _generation_progress, out)
        images = (job.output or {}).get("images", [])
        files = [out_dir / f"{image['image_id']}.png" for image in images]
        _downloaded(client, [(image["image_id"], path) for image, path in zip(images, files, strict=True)], out)
    if out.as_json:
        out.print_json({"job": _dump(job), "files": [str(path) for path in files]})
        return
    table = Table(title=f"{prompt!r}: job {job.id}")
    for column in ("image", "seed", "file"):
        table.add_column(column)
    for image, path in zip(images, files, strict=True):
        table.add_row(image["image_id"], str(image["seed"]), str(path))
    console.print(table)
    model_used = (job.provenance or {}).get("model") or {}
    console.print(f"job {job.id}: {_counted(len(files), 'image')} in {out_dir}"
                  + (f" (model {model_used.get('name')} version {model_used.get('version')})" if model_used else ""),
                  highlight=False)


def grid(
    subjects: Annotated[str, typer.Option(help="Comma-separated: the grid's rows, e.g. \"a fox,a lighthouse\"")],
    styles: Annotated[str, typer.Option(help="Comma-separated: the grid's columns, e.g. \"ink,oil,pixel art\"")],
    out_dir: Annotated[Path, typer.Option("--out", file_okay=False, help="Folder: <subject>/<style>-<seed>.png "
                                                                         "and cards/")],
    template: Annotated[str | None, typer.Option(help="Each cell's prompt, with {subject} and {style} "
                                                      "(default \"{subject}, in the style of {style}\")")] = None,
    images_per_prompt: Annotated[int | None, typer.Option(min=1, max=4, help="Images per cell (default 1)")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="The grid's seed; each cell's is derived from it "
                                                         "(random if absent, always recorded)")] = None,
    steps: Steps = None,
    width: Width = None,
    height: Height = None,
    scheduler: Scheduler = None,
    guidance_scale: Guidance = None,
    negative_prompt: NegativePrompt = None,
    model: Model = None,
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Render a subject x style grid (one job per cell): a progress bar over the cells, then every cell's images
    under --out as <subject>/<style>-<seed>.png and the contact sheets as cards/<kind>[-<style>].png."""
    out = Output(as_json)
    subject_list, style_list = _listed(subjects, "--subjects", out), _listed(styles, "--styles", out)
    settings = _Generation(model, steps, width, height, scheduler, guidance_scale, negative_prompt)
    cells_total = len(subject_list) * len(style_list)
    with _api_client(url, key, out) as client:
        job = client.generate_grid(subject_list, style_list, **settings.params(),
                                   **_params(template=template, images_per_prompt=images_per_prompt, seed=seed))
        job = _followed_job(client, job, f"grid of {cells_total} cells", cells_total, _cells_progress, out)
        output = job.output or {}
        cells = output.get("cells", [])
        cell_files: list[list[Path]] = [
            [out_dir / _file_name(cell["subject"]) / f"{_file_name(cell['style'])}-{image['seed']}.png"
             for image in cell.get("images", [])] for cell in cells]
        sheets = output.get("sheets", [])
        card_files = [out_dir / "cards" / (sheet["kind"] + (f"-{_file_name(sheet['style'])}" if sheet.get("style")
                                                            else "") + ".png") for sheet in sheets]
        downloads = [(image["image_id"], path) for cell, paths in zip(cells, cell_files, strict=True)
                     for image, path in zip(cell.get("images", []), paths, strict=True)]
        _downloaded(client, downloads + [(sheet["image_id"], path)
                                         for sheet, path in zip(sheets, card_files, strict=True)], out)
    failed = [cell for cell in cells if cell.get("status") != "succeeded"]
    if out.as_json:
        out.print_json({"job": _dump(job), "files": {
            "cells": [[str(path) for path in paths] for paths in cell_files],
            "cards": [str(path) for path in card_files]}})
    else:
        table = Table(title=f"grid job {job.id}: {len(subject_list)} subjects x {len(style_list)} styles")
        for column in ("subject", "style", "seed", "status", "files"):
            table.add_column(column)
        for cell, paths in zip(cells, cell_files, strict=True):
            table.add_row(cell["subject"], cell["style"], str(cell.get("seed", "")),
                          cell.get("status", "") if not cell.get("error") else
                          Text(f"{cell.get('status')} {_error_text(cell['error'])}", style="red"),
                          "\n".join(str(path.relative_to(out_dir)) for path in paths))
        console.print(table)
        console.print(f"grid {job.id}: {_counted(len(downloads), 'image')} and "
                      f"{_counted(len(card_files), 'contact sheet')} "
                      f"({', '.join(str(path.relative_to(out_dir)) for path in card_files)}) in {out_dir}",
                      highlight=False)
    if failed:
        out.fail(f"{len(failed)} of {len(cells)} cells failed.")


# --- jobs --------------------------------------------------------------------------------------------------------

def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _job_summary(job: "JobOut") -> str:
    """One line of what a job gave (or asked for), for `jobs list`."""
    if job.error:
        return _error_text(job.error)
    output, params = job.output or {}, job.params
    if output.get("labels"):
        top = output["labels"][0]
        return f"{top.get('label')} {top.get('score', 0):.3f}"
    if output.get("captions"):
        return str(output["captions"][0].get("text", ""))
    if isinstance(output.get("model"), dict):
        return f"{output['model'].get('name')} version {output['model'].get('version')}"
    if "faces" in output:
        return f"{len(output['faces'])} faces"
    if params.get("prompt"):
        return str(params["prompt"])
    if params.get("subjects"):
        return f"{len(params['subjects'])} subjects x {len(params.get('styles', []))} styles"
    return ""


@jobs_app.command("list")
def list_jobs(
    kind: Annotated[str | None, typer.Option(help="classify, caption, generate, train_classifier, ...")] = None,
    status: Annotated[str | None, typer.Option(help="queued | running | succeeded | failed | canceled")] = None,
    q: Annotated[str | None, typer.Option(help="Search labels, captions and prompts")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
    cursor: Annotated[str | None, typer.Option(help="The next page: the cursor the last one printed")] = None,
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Your jobs, newest first."""
    out = Output(as_json)
    with _api_client(url, key, out) as client:
        page = client.list_jobs(**_params(kind=kind, status=status, q=q, limit=limit, cursor=cursor))
    if out.as_json:
        out.print_json(page.model_dump(mode="json"))
        return
    table = Table(title=_counted(len(page.data), "job"))
    for column in ("id", "kind", "status", "created", "summary"):
        table.add_column(column, no_wrap=column == "id")
    for job in page.data:
        table.add_row(job.id, job.kind, Text(job.status, style=_STATUS_STYLES.get(job.status, "")),
                      _when(job.created_at), _job_summary(job))
    console.print(table)
    if page.next_cursor:
        console.print(f"more: --cursor {page.next_cursor}", style="dim", highlight=False)


@jobs_app.command("show")
def show_job(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """A job: its state, parameters, output, error and provenance."""
    out = Output(as_json)
    with _api_client(url, key, out) as client:
        job = client.get_job(job_id)
    if out.as_json:
        out.print_json(_dump(job))
        return
    console.print(Text.assemble((job.id, "bold"), f"  {job.kind}  ",
                                (job.status, _STATUS_STYLES.get(job.status, "")), f"  attempts {job.attempts}"))
    console.print(f"created {_when(job.created_at)}  started {_when(job.started_at) or '-'}  "
                  f"finished {_when(job.finished_at) or '-'}", style="dim", highlight=False)
    if job.parent_id:
        console.print(f"parent {job.parent_id}", highlight=False)
    if job.children:
        console.print(f"children ({len(job.children)}): {', '.join(job.children)}", highlight=False)
    for title, section in (("params", job.params), ("progress", job.progress if not job.output else None),
                           ("output", job.output), ("error", job.error), ("provenance", job.provenance)):
        if section:
            console.rule(title, align="left")
            console.print_json(data=section)


@jobs_app.command("watch")
def watch_job(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Follow a job live with a progress bar until it ends; exit 1 unless it succeeded."""
    out = Output(as_json)
    with _api_client(url, key, out) as client:
        job = client.get_job(job_id)
        job = _followed_job(client, job, f"{job.kind} {job.id}", None,
                            PROGRESS_VIEWS.get(job.kind, _counted_progress), out, must_succeed=False)
    if out.as_json:
        out.print_json(_dump(job))
    if job.status != "succeeded":
        out.fail(f"job {job.id} {job.status}: {_error_text(job.error)}")
    taken = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
    out.console.print(Text.assemble(f"job {job.id} ", ("succeeded", "green"),
                                    f" in {taken:.1f} s" if taken is not None else "",
                                    f": {_job_summary(job)}" if _job_summary(job) else ""))


@jobs_app.command("cancel")
def cancel_job(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a job: a queued one at once, a running one at its next step; an ended job stays as it is."""
    out = Output(as_json)
    with _api_client(url, key, out) as client:
        job = client.cancel_job(job_id)
    if out.as_json:
        out.print_json(_dump(job))
        return
    if job.status == "canceled":
        console.print(f"job {job.id}: canceled", highlight=False)
    elif job.status in ("queued", "running"):
        console.print(f"job {job.id}: {job.status}, canceling at its next step (`percept jobs watch {job.id}`)",
                      highlight=False)
    else:
        console.print(f"job {job.id} had already ended: {job.status}", highlight=False)


# --- models ------------------------------------------------------------------------------------------------------

def _latest_device(model: "ModelOut") -> str:
    latest = next((version for version in model.versions if version.version == model.latest), None)
    return (latest.device if latest else None) or ""


def list_models(url: Url = None, key: Key = None, as_json: AsJson = False) -> None:
    """The models you can use: the built-in ones and yours (through the API)."""
    out = Output(as_json)
    with _api_client(url, key, out) as client:
        models = client.list_models()
    if out.as_json:
        out.print_json([model.model_dump(mode="json") for model in models])
        return
    table = Table(title=_counted(len(models), "model"))
    for column in ("name", "kind", "latest", "builtin", "device"):
        table.add_column(column)
    for model in models:
        table.add_row(model.name, model.kind, model.latest, "yes" if model.builtin else "", _latest_device(model))
    console.print(table)


def show_model(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name")],
    url: Url = None,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """A model: its versions, and the latest one's card and metrics (through the API)."""
    out = Output(as_json)
    with _api_client(url, key, out) as client:
        model = client.get_model(name)
    if out.as_json:
        out.print_json(model.model_dump(mode="json"))
        return
    console.print(Text.assemble((model.name, "bold"), f"  {model.kind}  latest {model.latest}",
                                "  built-in" if model.builtin else ""))
    table = Table()
    for column in ("version", "status", "device", "weights sha256", "created"):
        table.add_column(column)
    for version in model.versions:
        table.add_row(version.version, version.status, version.device or "", (version.weights_sha256 or "")[:16],
                      _when(version.created_at))
    console.print(table)
    latest = next((version for version in model.versions if version.version == model.latest), None)
    for title, section in (("card", latest.card if latest else None), ("metrics", latest.metrics if latest else None)):
        if section:
            console.rule(f"{title} (version {model.latest})", align="left")
            console.print_json(data=section)


# --- training ----------------------------------------------------------------------------------------------------

def _analysed_dataset(client: "Percept", archive_path: Path, kind: str, refusal: str,
                      out: Output = TERMINAL) -> "DatasetOut":
    """Upload the zip, wait for its analysis job and return the ready dataset; exit 1 when the analysis fails or
    finds a dataset of another `kind` than the training needs."""
    with out.console.status(f"uploading {archive_path.name}"):
        uploaded = client.upload_dataset(archive_path)
    with out.console.status("analysing the dataset (a job on the datasets queue)"):
        while uploaded.status == "analyzing":
            if uploaded.job_id is not None:
                client.get_job(uploaded.job_id, wait=5)
            uploaded = client.get_dataset(uploaded.id)
    if uploaded.status != "ready":
        out.fail(f"dataset refused: {_error_text(uploaded.error)}")
    found = (uploaded.report or {}).get("kind")
    if found != kind:
        out.fail(f"dataset refused: {archive_path.name} is a {found!r} dataset, not {kind!r}. {refusal}")
    return uploaded


def train_classifier(
    dataset: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A zip with one folder per class")],
    name: Annotated[str, typer.Option(help="Model name; each training adds a version")],
    balance: Annotated[str, typer.Option(help="none | undersample | oversample | class_weight")] = "none",
    augment: Annotated[bool, typer.Option(help="Flips, rotations, crops, colour jitter, noise")] = False,
    epochs: int = 30,
    val_fraction: float = 0.2,
    target_precision: Annotated[float, typer.Option(help="Precision the `unknown` threshold is chosen for")] = 0.9,
    seed: int = 0,
    fine_tune: Annotated[bool, typer.Option(help="Also fine-tune the backbone's last block")] = False,
    url: Url = None,
    key: Key = None,
) -> None:
    """Upload DATASET, train a classifier on it with a progress bar, then print its metrics."""
    with _api_client(url, key) as client:
        uploaded = _analysed_dataset(client, dataset, "classes", "A classifier trains on one folder per class; "
                                     "train a captioner with `percept train captioner`.")
        summary = uploaded.report or {}
        counts = ", ".join(f"{label} {count}" for label, count in summary["classes"].items())
        console.print(f"dataset {uploaded.id}: {summary['num_images']} images ({counts})")
        for warning in summary.get("warnings", []):
            console.print(f"[yellow]warning:[/] {warning}")
        job = client.train_classifier(uploaded.id, name, balance=balance, augment=augment, epochs=epochs,
                                      val_fraction=val_fraction, target_precision=target_precision, seed=seed,
                                      fine_tune=fine_tune)
        job = _followed_job(client, job, f"training {name}", epochs, _classifier_progress)
    output = job.output or {}
    metrics, model = output["metrics"], output["model"]
    table = Table(title=f"{model['name']} version {model['version']} (validation set)")
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for label, row in metrics["per_class"].items():
        table.add_row(label, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    console.print(table)
    console.print(f"macro F1 {metrics['macro_f1']:.3f}; unknown below {metrics['threshold']:.3f} "
                  f"(precision {metrics.get('precision_at_threshold', 0):.3f} at coverage "
                  f"{metrics.get('coverage', 0):.2f}, target {metrics['target_precision']})")


def train_captioner(
    dataset: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                            help="A zip of captioned images: Flickr8k layout, COCO captions, "
                                                 "captions.jsonl or captions.csv")],
    name: Annotated[str, typer.Option(help="Model name; each training adds a version")],
    architecture: Annotated[str, typer.Option(help="merge (the image joins the LSTM's output) | inject (the image "
                                                   "is the LSTM's first input)")] = "merge",
    epochs: Annotated[int, typer.Option(help="At most this many; early stopping on the validation loss")] = 20,
    min_word_count: Annotated[int, typer.Option(help="Rarer words become the unknown token")] = 2,
    beam_width: Annotated[int, typer.Option(help="Beam width of the evaluation (BLEU with beam search)")] = 3,
    seed: int = 0,
    url: Url = None,
    key: Key = None,
) -> None:
    """Upload DATASET, train an LSTM captioner on it with a progress bar, then print its test BLEU and examples."""
    with _api_client(url, key) as client:
        uploaded = _analysed_dataset(client, dataset, "captions", "A captioner trains on captioned images (Flickr8k "
                                     "layout, COCO captions, captions.jsonl/csv); train a classifier on class "
                                     "folders with `percept train classifier`.")
        summary = uploaded.report or {}
        splits = ", ".join(f"{split} {count}" for split, count in summary.get("splits", {}).items())
        console.print(f"dataset {uploaded.id} ({summary['layout']}): {summary['num_images']} images, "
                      f"{summary['num_captions']} captions" + (f" ({splits})" if splits else ""))
        for warning in summary.get("warnings", []):
            console.print(f"[yellow]warning:[/] {warning}")
        job = client.train_captioner(uploaded.id, name, architecture=architecture, epochs=epochs,
                                     min_word_count=min_word_count, beam_width=beam_width, seed=seed)
        job = _followed_job(client, job, f"training {name}", epochs, _captioner_progress)
    output = job.output or {}
    model, bleu = output["model"], output["bleu"]
    table = Table(title=f"{model['name']} version {model['version']} (test set BLEU)")
    for column in ("decoding", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        table.add_column(column, justify="left" if column == "decoding" else "right")
    for decoding, label in (("greedy", "greedy"), ("beam", f"beam-{bleu['beam_width']}")):
        table.add_row(label, *(f"{score:.3f}" for score in bleu[decoding]))
    console.print(table)
    for example in output.get("examples", [])[:EXAMPLES_SHOWN]:
        console.print(f"[bold]{example['image']}[/]", highlight=False)
        for reference in example["references"]:
            console.print(f"  reference  {reference}", style="dim", highlight=False)
        console.print(f"  greedy     {example['greedy']}", highlight=False)
        console.print(f"  beam       {example['beam']}", highlight=False)


def register(app: typer.Typer, train_app: typer.Typer, models_app: typer.Typer) -> None:
    """Add the commands to the CLI's apps (percept/cli.py calls this once, after defining its own)."""
    app.command("classify")(classify)
    app.command("caption")(caption)
    app.add_typer(faces_app, name="faces")
    app.command("generate")(generate)
    app.command("grid")(grid)
    app.add_typer(jobs_app, name="jobs")
    models_app.command("list")(list_models)
    models_app.command("show")(show_model)
    train_app.command("classifier")(train_classifier)
    train_app.command("captioner")(train_captioner)
