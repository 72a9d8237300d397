"""Captioned-image datasets in a zip: the Flickr8k layout, COCO captions, `captions.jsonl` or `captions.csv`.

Read with the same zip safety as class datasets (percept.datasets.open_checked_zip: every entry checked
before anything is inflated), summarised for the dataset report, and handed to caption trainers as
`CaptionedImage`s. Framework-free: the standard library and Pillow.

Layouts, found at any depth in the zip:
- Flickr8k, as its two official archives unpack: the images (`Flicker8k_Dataset/`, spelled as in the
  original), `Flickr8k.token.txt` (`name.jpg#k<TAB>caption`) and the split files
  `Flickr_8k.trainImages.txt`, `Flickr_8k.devImages.txt`, `Flickr_8k.testImages.txt`.
- COCO captions: `annotations/captions_*.json` (`images[].file_name`, `annotations[].image_id/caption`)
  with the image folders; `captions_train*` is the train split, `captions_val*` the test split.
- `captions.jsonl`: one `{"image": "path", "captions": [...], "split": optional}` per line.
- `captions.csv`: a header with `image` and `caption` (and optionally `split`), one row per caption.
Image paths in jsonl and csv are relative to the caption file's folder; a bare file name also matches
an image of that name anywhere in the zip.
"""

import csv
import io
import json
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from percept.datasets import DatasetLimits, InvalidDataset, open_checked_zip, read_zip_member
from percept.errors import PerceptError
from percept.imaging import decode_rgb

Layout = Literal["flickr8k", "coco", "jsonl", "csv"]
SPLITS = ("train", "dev", "test")
FLICKR_TOKENS = "Flickr8k.token.txt"
FLICKR_SPLIT_FILES = {"Flickr_8k.trainImages.txt": "train", "Flickr_8k.devImages.txt": "dev",
                      "Flickr_8k.testImages.txt": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Caption files are text: far below the image cap, and read whole.
MAX_CAPTION_FILE_BYTES = 256 * 1024 * 1024
DEFAULT_MIN_WORD_COUNT = 5
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_MAX_LISTED = 20
# Images are checked from a small decode: enough to know the file is an image.
_CHECK_DECODE_SIZE = 64


@dataclass
class CaptionedImage:
    name: str  # the image's path inside the archive
    data: bytes = field(repr=False)
    captions: list[str]
    split: str | None  # "train" | "dev" | "test", or None when the dataset names no splits


@dataclass
class _Captions:
    layout: Layout
    caption_file: str
    by_image: dict[str, list[str]]  # the image as the caption file names it -> its captions, in file order
    splits: dict[str, str]  # the image as named -> split
    base: str  # the caption file's folder: jsonl/csv paths are relative to it
    by_basename: dict[str, zipfile.ZipInfo] = field(default_factory=dict)  # the first image of each file name


def tokenize(caption: str) -> list[str]:
    """The words of a caption, lowercased, punctuation dropped: what vocabularies and BLEU count."""
    return _WORD.findall(caption.lower())


def caption_layout(names: list[str]) -> Layout | None:
    """Which caption layout the archive's file paths show, if any (class folders otherwise)."""
    basenames = {name.rsplit("/", 1)[-1] for name in names}
    if FLICKR_TOKENS in basenames:
        return "flickr8k"
    if any(re.search(r"(^|/)annotations/captions_[^/]*\.json$", name) for name in names):
        return "coco"
    if "captions.jsonl" in basenames:
        return "jsonl"
    if "captions.csv" in basenames:
        return "csv"
    return None


def is_caption_dataset(zip_bytes: bytes, limits: DatasetLimits) -> bool:
    _, files = open_checked_zip(zip_bytes, limits)
    return caption_layout(["/".join(parts) for _, parts in files]) is not None


def read_caption_dataset(zip_bytes: bytes, limits: DatasetLimits) -> list[CaptionedImage]:
    """Every captioned image that is in the archive, with its captions and split, sorted by path.
    Images named by the caption file but missing, and images no caption names, are left out (the
    analysis reports both)."""
    archive, members, captions = _open(zip_bytes, limits)
    with archive:
        found = []
        for named, texts in captions.by_image.items():
            info = _find(members, captions, named)
            if info is not None:
                path = info.orig_filename.replace("\\", "/")
                found.append(CaptionedImage(path, read_zip_member(archive, info, path), texts,
                                            captions.splits.get(named)))
    if not found:
        raise InvalidDataset(f"None of the images {captions.caption_file!r} names is in the zip: put the images "
                             "beside it (Flickr8k: in Flicker8k_Dataset/).", code="no_captioned_images")
    return sorted(found, key=lambda image: image.name)


def read_dataset_file(zip_bytes: bytes, limits: DatasetLimits, path: str) -> bytes | None:
    """The bytes of the file at `path` inside the dataset zip (a trainer's extra input: word vectors, an
    encoder), read with the dataset's zip checks; None when the zip holds no such file."""
    wanted = path.replace("\\", "/").lstrip("/")
    wanted = wanted[2:] if wanted.startswith("./") else wanted
    archive, files = open_checked_zip(zip_bytes, limits)
    with archive:
        for info, parts in files:
            if "/".join(parts) == wanted:
                return read_zip_member(archive, info, wanted)
    return None


def analyse_caption_dataset(zip_bytes: bytes, limits: DatasetLimits,
                            min_word_count: int = DEFAULT_MIN_WORD_COUNT) -> dict[str, Any]:
    """The dataset report: images, captions, captions per image, vocabulary at `min_word_count`, caption
    length percentiles, splits, images named but missing (and the reverse), undecodable files."""
    archive, members, captions = _open(zip_bytes, limits)
    with archive:
        matched: dict[str, zipfile.ZipInfo] = {}
        missing = []
        for named in captions.by_image:
            info = _find(members, captions, named)
            if info is None:
                missing.append(named)
            else:
                matched[named] = info
        undecodable = []
        for info in matched.values():
            path = info.orig_filename.replace("\\", "/")
            try:
                decode_rgb(read_zip_member(archive, info, path), limits.max_image_pixels, at_least=_CHECK_DECODE_SIZE)
            except PerceptError:
                undecodable.append(path)
    used = {info.orig_filename.replace("\\", "/") for info in matched.values()}
    uncaptioned = sorted(path for path in members if path not in used)
    readable = {named: texts for named, texts in captions.by_image.items()
                if named in matched and matched[named].orig_filename.replace("\\", "/") not in undecodable}
    texts = [text for group in readable.values() for text in group]
    lengths = sorted(len(tokenize(text)) for text in texts)
    words = Counter(word for text in texts for word in tokenize(text))
    per_image = [len(group) for group in readable.values()]
    splits = Counter(captions.splits.get(named, "unassigned") for named in readable)
    if not readable:
        raise InvalidDataset(f"None of the images {captions.caption_file!r} names is in the zip and readable: "
                             "put the images beside it (Flickr8k: in Flicker8k_Dataset/).",
                             code="no_captioned_images", details={"missing": missing[:_MAX_LISTED]})
    warnings = []
    if missing:
        warnings.append(f"{len(missing)} images named in {captions.caption_file} are not in the zip; "
                        "they are left out.")
    if uncaptioned:
        warnings.append(f"{len(uncaptioned)} images have no caption; they are left out.")
    if undecodable:
        warnings.append(f"{len(undecodable)} images could not be decoded; they are left out.")
    if not captions.splits:
        warnings.append("The dataset names no splits: training holds out a seeded share for validation and test.")
    return {
        "kind": "captions",
        "layout": captions.layout,
        "caption_file": captions.caption_file,
        "num_images": len(readable),
        "num_captions": len(texts),
        "captions_per_image": {"min": min(per_image), "max": max(per_image),
                               "mean": round(sum(per_image) / len(per_image), 2)},
        "vocabulary": {"min_word_count": min_word_count, "size": sum(1 for n in words.values() if n >= min_word_count),
                       "all_words": len(words), "tokens": sum(words.values())},
        "caption_length": {f"p{q}": _percentile(lengths, q) for q in (50, 90, 99)} | {"max": lengths[-1]},
        "splits": dict(sorted(splits.items())),
        "missing_images": {"count": len(missing), "files": missing[:_MAX_LISTED]},
        "uncaptioned_images": {"count": len(uncaptioned), "files": uncaptioned[:_MAX_LISTED]},
        "undecodable": {"count": len(undecodable), "files": undecodable[:_MAX_LISTED]},
        "warnings": warnings,
    }


# --- reading the caption files ------------------------------------------------------------------------


def _open(zip_bytes: bytes, limits: DatasetLimits
          ) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo], _Captions]:
    archive, files = open_checked_zip(zip_bytes, limits)
    by_path = {"/".join(parts): info for info, parts in files}
    layout = caption_layout(list(by_path))
    if layout is None:
        raise InvalidDataset("The zip holds no caption file: add Flickr8k.token.txt (Flickr8k layout), "
                             "annotations/captions_*.json (COCO), captions.jsonl or captions.csv.",
                             code="no_caption_file")
    images = {path: info for path, info in by_path.items() if path.lower().endswith(IMAGE_SUFFIXES)}
    parse = {"flickr8k": _flickr8k, "coco": _coco, "jsonl": _jsonl, "csv": _csv}[layout]
    captions = parse(archive, by_path)
    for path, info in images.items():
        captions.by_basename.setdefault(path.rsplit("/", 1)[-1], info)
    if not captions.by_image:
        raise InvalidDataset(f"{captions.caption_file!r} holds no captions.", code="invalid_caption_file",
                             details={"file": captions.caption_file})
    return archive, images, captions


def _text(archive: zipfile.ZipFile, by_path: dict[str, zipfile.ZipInfo], path: str) -> str:
    info = by_path[path]
    if info.file_size > MAX_CAPTION_FILE_BYTES:
        raise InvalidDataset(f"{path!r} is larger than {MAX_CAPTION_FILE_BYTES // 2**20} MB, more than any caption "
                             "file needs.", code="invalid_caption_file", details={"file": path})
    data = read_zip_member(archive, info, path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise _bad_line(path, line, "is not UTF-8 text") from None


def _bad_line(path: str, line: int, problem: str) -> InvalidDataset:
    return InvalidDataset(f"{path!r}, line {line}: {problem}.", code="invalid_caption_file",
                          details={"file": path, "line": line})


def _too_deep(path: str, line: int) -> InvalidDataset:
    # json.loads recurses once per nesting level: `[[[[...` a few thousand deep exhausts the stack.
    return _bad_line(path, line, "JSON nested too deeply to be captions")


def _file_name(value: object) -> str:
    """A COCO image's `file_name`, which must be text (a number or a list names no file)."""
    if not isinstance(value, str):
        raise TypeError("`file_name` as text")
    return value


def _only(paths: list[str], what: str) -> str:
    if len(paths) > 1:
        raise InvalidDataset(f"The zip holds {len(paths)} {what} files ({', '.join(paths[:3])}): keep one.",
                             code="ambiguous_caption_files", details={"files": paths[:_MAX_LISTED]})
    return paths[0]


def _flickr8k(archive: zipfile.ZipFile, by_path: dict[str, zipfile.ZipInfo]) -> _Captions:
    path = _only([p for p in by_path if p.rsplit("/", 1)[-1] == FLICKR_TOKENS], FLICKR_TOKENS)
    by_image: dict[str, list[str]] = {}
    for number, line in enumerate(_text(archive, by_path, path).splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, index = key.partition("#")
        if not tab or not hash_sign or not index.strip().isdigit() or not name.strip() or not caption.strip():
            raise _bad_line(path, number, "expected `name.jpg#k<TAB>caption`")
        by_image.setdefault(name.strip(), []).append(caption.strip())
    splits: dict[str, str] = {}
    for split_path in sorted(p for p in by_path if p.rsplit("/", 1)[-1] in FLICKR_SPLIT_FILES):
        split = FLICKR_SPLIT_FILES[split_path.rsplit("/", 1)[-1]]
        for name in _text(archive, by_path, split_path).split():
            splits[name] = split
    return _Captions("flickr8k", path, by_image, splits, base="")


def _coco(archive: zipfile.ZipFile, by_path: dict[str, zipfile.ZipInfo]) -> _Captions:
    paths = sorted(p for p in by_path if re.search(r"(^|/)annotations/captions_[^/]*\.json$", p))
    by_image: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    for path in paths:
        try:
            document = json.loads(_text(archive, by_path, path))
            names = {image["id"]: _file_name(image["file_name"]) for image in document["images"]}
            for annotation in document["annotations"]:
                name = names[annotation["image_id"]]
                by_image.setdefault(name, []).append(str(annotation["caption"]).strip())
        except json.JSONDecodeError as exc:
            raise _bad_line(path, exc.lineno, f"not JSON ({exc.msg})") from None
        except RecursionError:
            raise _too_deep(path, 1) from None
        except (KeyError, TypeError) as exc:
            raise InvalidDataset(f"{path!r} is not COCO captions: it needs `images` with `id` and `file_name` and "
                                 f"`annotations` with `image_id` and `caption` (missing {exc}).",
                                 code="invalid_caption_file", details={"file": path}) from None
        split = "train" if "train" in path.rsplit("/", 1)[-1] else "test" if "val" in path.rsplit("/", 1)[-1] else None
        if split:
            splits.update({name: split for name in names.values()})
    return _Captions("coco", ", ".join(paths), by_image, splits, base="")


def _add(by_image: dict[str, list[str]], splits: dict[str, str], image: str, captions: list[str],
         split: str | None, path: str, number: int) -> None:
    if split is not None and split not in SPLITS:
        raise _bad_line(path, number, f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    by_image.setdefault(image, []).extend(captions)
    if split:
        splits[image] = split


def _jsonl(archive: zipfile.ZipFile, by_path: dict[str, zipfile.ZipInfo]) -> _Captions:
    path = _only([p for p in by_path if p.rsplit("/", 1)[-1] == "captions.jsonl"], "captions.jsonl")
    by_image: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    for number, line in enumerate(_text(archive, by_path, path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad_line(path, number, f"not a JSON object ({exc.msg})") from None
        except RecursionError:
            raise _too_deep(path, number) from None
        texts = record.get("captions") if isinstance(record, dict) else None
        if (not isinstance(record, dict) or not isinstance(record.get("image"), str) or not isinstance(texts, list)
                or not texts or not all(isinstance(t, str) and t.strip() for t in texts)):
            raise _bad_line(path, number, 'expected {"image": "path", "captions": ["a caption", ...]}')
        _add(by_image, splits, record["image"], [t.strip() for t in texts], record.get("split"), path, number)
    return _Captions("jsonl", path, by_image, splits, base=path.rpartition("/")[0])


def _csv(archive: zipfile.ZipFile, by_path: dict[str, zipfile.ZipInfo]) -> _Captions:
    path = _only([p for p in by_path if p.rsplit("/", 1)[-1] == "captions.csv"], "captions.csv")
    reader = csv.DictReader(io.StringIO(_text(archive, by_path, path)))
    try:
        fieldnames = reader.fieldnames  # reads the header row, which can be as broken as any other
    except csv.Error as exc:
        raise _bad_line(path, 1, f"not CSV ({exc})") from None
    if not fieldnames or not {"image", "caption"} <= set(fieldnames):
        raise _bad_line(path, 1, "the header must name the columns `image` and `caption` (and optionally `split`)")
    by_image: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    try:
        for row in reader:
            image, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
            if not image or not caption:
                raise _bad_line(path, reader.line_num, "every row needs an image and a caption")
            _add(by_image, splits, image, [caption], (row.get("split") or "").strip() or None, path, reader.line_num)
    except csv.Error as exc:
        raise _bad_line(path, reader.line_num, f"not CSV ({exc})") from None
    return _Captions("csv", path, by_image, splits, base=path.rpartition("/")[0])


def _find(images: dict[str, zipfile.ZipInfo], captions: _Captions, named: str) -> zipfile.ZipInfo | None:
    """The archive entry of an image as the caption file names it: its path relative to the caption file,
    else the one image of that file name (Flickr8k and COCO name images by file name only)."""
    named = named.replace("\\", "/").lstrip("./")
    if captions.base and f"{captions.base}/{named}" in images:
        return images[f"{captions.base}/{named}"]
    if named in images:
        return images[named]
    return captions.by_basename.get(named.rsplit("/", 1)[-1])


def _percentile(values: list[int], q: int) -> int:
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]
