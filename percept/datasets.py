"""Labelled-image datasets uploaded as a zip with one folder per class: safe intake and a summary.

Nothing is extracted to disk. The central directory is checked before any member is inflated
(paths, symlinks, encryption, declared sizes and compression ratios), and each member is then
read with a byte budget of its declared size, so a zip bomb or a lying header is refused, never
allocated. Analysis runs as a job (`analyze_dataset`, on the datasets queue) so that the gateway only
stores the upload; Pillow and the standard library only (no numpy).
"""

import hashlib
import lzma
import re
import stat
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from statistics import fmean
from typing import Any

from PIL import Image

from percept.errors import PerceptError
from percept.imaging import decode_rgb, oriented_size
from percept.predictor import StepCallback, TrainingData, TrainingResult
from percept.services import DATASETS_QUEUE, JobKind

# The platform's own job kind: a dataset's report is the output of its analysis job.
ANALYZE_DATASET = JobKind("analyze_dataset", queue=DATASETS_QUEUE, task="percept.analyze_dataset",
                          trainer="percept.datasets:DatasetAnalyzer")

# Near duplicates: 64-bit dHashes at most this many bits apart. Re-encoding, resizing or a small
# brightness change flips a few bits; unrelated images differ in about half of them (32 +- 4), so 6
# (under 10% of the bits) catches edited copies while staying ~6 standard deviations from chance.
NEAR_DUPLICATE_MAX_DISTANCE = 6
# Images are hashed from a decode at least this large: far above dHash's 9x8, far below a photo.
DHASH_DECODE_SIZE = 64
_HASH_BITS = 64

# Each image may bring a macOS `__MACOSX/._name` entry and folders come as entries too, so the
# archive may hold a few entries per image; `max_files` itself counts the image files.
_ENTRIES_PER_FILE = 3
_CENTRAL_DIRECTORY_SIGNATURE = b"PK\x01\x02"
# A small member that compresses well (a 4 KiB run of zeros is 200:1) can't hurt: the ratio guard
# is for members that would inflate into something big.
_RATIO_CHECK_MIN_BYTES = 1024 * 1024
# No image under the pixel cap needs more than 4 bytes a pixel (8-bit RGBA stored raw), plus room
# for headers, colour profiles and embedded thumbnails.
_MAX_BYTES_PER_PIXEL = 4
_IMAGE_HEADER_ALLOWANCE = 1024 * 1024
_READ_CHUNK = 1024 * 1024
_SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
# Written by macOS Finder and Windows Explorer; never part of a dataset.
_SYSTEM_FOLDERS = {"__MACOSX"}
_SYSTEM_FILES = {"Thumbs.db", "desktop.ini"}

_MAX_LISTED_UNDECODABLE = 20
_MAX_LISTED_GROUPS = 100
# Fewer images than this leave a class nearly empty after a train/validation split.
_FEW_IMAGES_PER_CLASS = 5
_IMBALANCE_RATIO = 10


class NotAZip(PerceptError):
    status, code = 415, "not_a_zip"


class UnsafeZipPath(PerceptError):
    status, code = 422, "unsafe_zip_path"


class ZipTooLarge(PerceptError):
    status, code = 413, "zip_too_large"


class InvalidDataset(PerceptError):
    """Codes: encrypted_zip, unsupported_zip_compression, duplicate_zip_path, empty_dataset, too_few_classes."""

    status, code = 422, "invalid_dataset"


@dataclass(frozen=True)
class DatasetLimits:
    max_zip_bytes: int = 500 * 1024 * 1024
    max_uncompressed_bytes: int = 2 * 1024**3
    max_files: int = 50_000
    max_compression_ratio: float = 200.0  # per member
    max_image_pixels: int = 40_000_000

    @classmethod
    def from_settings(cls, settings: Any) -> "DatasetLimits":
        return cls(max_zip_bytes=settings.max_dataset_bytes, max_files=settings.max_dataset_files,
                   max_uncompressed_bytes=settings.max_dataset_uncompressed_bytes,
                   max_image_pixels=settings.max_image_pixels)


@dataclass
class DatasetEntry:
    path: str  # inside the archive, with `/` separators
    label: str  # the class folder's name
    data: bytes = field(repr=False)  # the raw file bytes


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    path: str
    label: str


@dataclass(frozen=True)
class _Manifest:
    archive: zipfile.ZipFile
    members: list[_Member]  # sorted by path
    loose_files: list[str]  # at the top level, outside any class folder: ignored


@dataclass(frozen=True)
class _ImageRecord:
    path: str
    label: str
    sha256: str
    dhash: int
    width: int
    height: int


def iter_dataset(zip_bytes: bytes, limits: DatasetLimits) -> Iterator[DatasetEntry]:
    """The dataset's files with their class labels, sorted by path.

    The whole archive is checked when this is called, before anything is inflated; reading a member
    can still raise `not_a_zip` if its data turns out to be corrupt.
    """
    return _read_entries(_open_manifest(zip_bytes, limits))


class DatasetAnalyzer:
    """The `analyze_dataset` job: the dataset's report as the job's output (no model). A zip with a caption
    file is a captioned-image dataset (percept.captions); any other, class folders."""

    def train(self, data: TrainingData, params: dict[str, Any], on_step: StepCallback) -> TrainingResult:
        from percept.captions import analyse_caption_dataset, is_caption_dataset

        if data.archive is None:
            raise ValueError("an analysis job needs a dataset")
        if is_caption_dataset(data.archive, data.limits):
            return TrainingResult(metrics={}, output={"report": analyse_caption_dataset(data.archive, data.limits)})
        return TrainingResult(metrics={}, output={"report": {"kind": "classes",
                                                             **analyse_dataset(data.archive, data.limits)}})


def analyse_dataset(zip_bytes: bytes, limits: DatasetLimits) -> dict[str, Any]:
    """Check a dataset zip and summarise it: images per class, unreadable files, sizes, duplicates.

    Counts in `duplicates` are images that could be removed: `exact_count` byte-for-byte copies,
    `near_count` further images that look like another one (a dHash within
    NEAR_DUPLICATE_MAX_DISTANCE bits). Near groups are chains of such matches and include any exact
    copies among them; `cross_class` lists the groups (exact or near) spanning more than one class.
    Group lists are capped at 100; the counts are not.
    """
    # 1. Check the archive: raises before anything is inflated
    manifest = _open_manifest(zip_bytes, limits)

    # 2. Decode every file once: an unreadable one is reported, not fatal
    images: list[_ImageRecord] = []
    undecodable: list[tuple[str, str]] = []  # (path, label)
    for entry in _read_entries(manifest):
        record = _describe(entry, limits.max_image_pixels)
        if record is None:
            undecodable.append((entry.path, entry.label))
        else:
            images.append(record)

    # 3. Classes: a class counts once it has a readable image
    counts: dict[str, int] = defaultdict(int)
    for image in images:
        counts[image.label] += 1
    classes = dict(sorted(counts.items()))
    _check_classes(classes, len(undecodable))

    # 4. Duplicates: same bytes, or the same picture by perceptual hash
    exact, near, cross_class = _duplicate_groups(images)
    by_path = {image.path: image for image in images}
    exact_count = sum(len(group) - 1 for group in exact)
    near_count = sum(len({by_path[p].sha256 for p in group}) - 1 for group in near)

    undecodable_by_class: dict[str, int] = defaultdict(int)
    for _, label in undecodable:
        undecodable_by_class[label] += 1
    labels = {member.label for member in manifest.members}
    return {
        "classes": classes,
        "num_classes": len(classes),
        "num_images": len(images),
        "undecodable": {
            "count": len(undecodable),
            "files": [path for path, _ in undecodable[:_MAX_LISTED_UNDECODABLE]],
            "by_class": dict(sorted(undecodable_by_class.items())),
        },
        "image_sizes": {
            "width": _stats([image.width for image in images]),
            "height": _stats([image.height for image in images]),
        },
        "duplicates": {
            "exact": exact[:_MAX_LISTED_GROUPS],
            "near": near[:_MAX_LISTED_GROUPS],
            "cross_class": cross_class[:_MAX_LISTED_GROUPS],
            "exact_count": exact_count,
            "near_count": near_count,
        },
        "warnings": _warnings(manifest, classes, sorted(labels - classes.keys()), len(undecodable),
                              exact_count, near_count, cross_class),
    }


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: grayscale, shrink to 9x8, one bit per pair of horizontal neighbours.

    It follows the picture's structure (where it gets lighter or darker), not its exact bytes or
    colours, so a re-encoded or slightly brightened copy keeps nearly all its bits. A flat image
    hashes to 0 whatever its colour.
    """
    pixels = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS).tobytes()
    value = 0
    for row in range(0, 72, 9):
        for col in range(row, row + 8):
            value = (value << 1) | (pixels[col] > pixels[col + 1])
    return value


def open_checked_zip(zip_bytes: bytes, limits: DatasetLimits
                     ) -> tuple[zipfile.ZipFile, list[tuple[zipfile.ZipInfo, list[str]]]]:
    """The archive and its files (entry, path parts), every entry checked before anything is inflated:
    sizes, compression ratios, paths, links, encryption. Hidden and system files are left out."""
    # 1. Sizes we can see without parsing: a huge central directory costs memory just to list
    if len(zip_bytes) > limits.max_zip_bytes:
        raise ZipTooLarge(f"The zip is {_mb(len(zip_bytes))}: the limit is {_mb(limits.max_zip_bytes)}; "
                          "split the dataset or resize its images.", details={"max_bytes": limits.max_zip_bytes})
    # Every central-directory record starts with this signature, so the count bounds the entries.
    if zip_bytes.count(_CENTRAL_DIRECTORY_SIGNATURE) > limits.max_files * _ENTRIES_PER_FILE:
        raise _too_many_files(limits)

    # 2. The central directory
    try:
        archive = zipfile.ZipFile(BytesIO(zip_bytes))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise NotAZip("The upload is not a readable zip archive: send a .zip with one folder per class, "
                      "e.g. cats/1.jpg and dogs/1.jpg.") from None

    # 3. Every entry, before anything is inflated: paths, links, encryption, declared sizes
    files: list[tuple[zipfile.ZipInfo, list[str]]] = []
    declared_total = 0
    for info in archive.infolist():
        parts = _safe_parts(info.orig_filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeZipPath(f"The zip contains a symbolic link ({info.orig_filename!r}): "
                                "zip the files themselves, not links to them.", details={"path": info.orig_filename})
        if info.is_dir() or info.orig_filename.endswith("\\") or not parts:
            continue
        _check_member(info, limits)
        declared_total += info.file_size
        if declared_total > limits.max_uncompressed_bytes:
            raise ZipTooLarge(f"The zip would unpack to more than {_mb(limits.max_uncompressed_bytes)}: "
                              "split the dataset or resize its images.",
                              details={"max_uncompressed_bytes": limits.max_uncompressed_bytes})
        if not _is_system_file(parts):
            files.append((info, parts))
    return archive, files


def _open_manifest(zip_bytes: bytes, limits: DatasetLimits) -> _Manifest:
    archive, files = open_checked_zip(zip_bytes, limits)

    # 4. Labels: the first folder, under one optional wrapper folder (mydata/cats/1.jpg)
    wrapped = len({parts[0] for _, parts in files}) == 1 and any(len(parts) > 2 for _, parts in files)
    depth = 1 if wrapped else 0
    members: list[_Member] = []
    loose_files: list[str] = []
    for info, parts in files:
        if len(parts) - depth < 2:
            loose_files.append("/".join(parts))
        else:
            members.append(_Member(info, "/".join(parts), parts[depth]))
    members.sort(key=lambda member: member.path)
    _check_members(members, limits)
    return _Manifest(archive, members, sorted(loose_files))


def _safe_parts(name: str) -> list[str]:
    """The path's components, or UnsafeZipPath if it could point outside the archive."""
    # Some Windows tools write `\` separators; read them as separators so `..\x` is caught too.
    path = name.replace("\\", "/")
    parts = path.split("/")
    if "\x00" in name or path.startswith("/") or _DRIVE_LETTER.match(path) or ".." in parts:
        raise UnsafeZipPath(f"The zip contains an unsafe path ({name!r}): entries must be relative paths "
                            "inside the archive, e.g. cats/1.jpg.", details={"path": name})
    return [part for part in parts if part not in ("", ".")]


def _check_member(info: zipfile.ZipInfo, limits: DatasetLimits) -> None:
    if info.flag_bits & 0x1:
        raise InvalidDataset(f"The zip is password-protected ({info.orig_filename!r} is encrypted): "
                             "zip the dataset again without a password.", code="encrypted_zip")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise InvalidDataset(f"{info.orig_filename!r} uses an unsupported compression method "
                             f"({info.compress_type}): zip the dataset again with standard (deflate) compression.",
                             code="unsupported_zip_compression")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _RATIO_CHECK_MIN_BYTES and ratio > limits.max_compression_ratio:
        raise ZipTooLarge(f"{info.orig_filename!r} would inflate {ratio:.0f} times (the limit is "
                          f"{limits.max_compression_ratio:g}); this looks like a zip bomb, not a dataset.",
                          details={"path": info.orig_filename, "max_compression_ratio": limits.max_compression_ratio})


def _is_system_file(parts: list[str]) -> bool:
    """Hidden files (.DS_Store, ._x) and what macOS or Windows add to an archive: skipped silently."""
    return any(part.startswith(".") or part in _SYSTEM_FOLDERS for part in parts) or parts[-1] in _SYSTEM_FILES


def _check_members(members: list[_Member], limits: DatasetLimits) -> None:
    if len(members) > limits.max_files:
        raise _too_many_files(limits)
    for before, after in zip(members, members[1:], strict=False):
        if before.path == after.path:
            raise InvalidDataset(f"The zip holds {after.path!r} twice: zip the dataset again from its folders.",
                                 code="duplicate_zip_path", details={"path": after.path})
    max_member_bytes = limits.max_image_pixels * _MAX_BYTES_PER_PIXEL + _IMAGE_HEADER_ALLOWANCE
    for member in members:
        if member.info.file_size > max_member_bytes:
            raise ZipTooLarge(f"{member.path!r} is {_mb(member.info.file_size)}: larger than any image under the "
                              f"{limits.max_image_pixels / 1e6:g} megapixel limit; resize it or remove it.",
                              details={"path": member.path, "max_member_bytes": max_member_bytes})
    labels = sorted({member.label for member in members})
    if not labels:
        raise InvalidDataset("The zip holds no images in class folders: put each class's images in its own "
                             "folder, e.g. cats/1.jpg and dogs/1.jpg.", code="empty_dataset")
    if len(labels) < 2:
        raise InvalidDataset(f"The zip has one class folder ({labels[0]!r}): a classifier needs at least 2; "
                             "put each class's images in its own folder, e.g. cats/1.jpg and dogs/1.jpg.",
                             code="too_few_classes", details={"classes": labels})


def _too_many_files(limits: DatasetLimits) -> ZipTooLarge:
    return ZipTooLarge(f"The zip holds more than {limits.max_files} files: split the dataset.",
                       details={"max_files": limits.max_files})


def _read_entries(manifest: _Manifest) -> Iterator[DatasetEntry]:
    with manifest.archive:
        for member in manifest.members:
            yield DatasetEntry(member.path, member.label, _read_member(manifest.archive, member))


def _read_member(archive: zipfile.ZipFile, member: _Member) -> bytes:
    return read_zip_member(archive, member.info, member.path)


def read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    """The member's bytes, never more than its declared size (whose total was checked against the cap)."""
    budget = info.file_size
    chunks: list[bytes] = []
    size = 0
    try:
        with archive.open(info) as stream:
            # Ask for one byte past the budget, so a member longer than declared is noticed.
            while chunk := stream.read(min(_READ_CHUNK, budget + 1 - size)):
                size += len(chunk)
                if size > budget:
                    raise ZipTooLarge(f"{path!r} holds more data than its header declares: "
                                      "zip the dataset again.", details={"path": path})
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError) as exc:
        raise NotAZip(f"The zip is corrupt ({path!r} can't be unpacked: {exc}); zip the dataset again.",
                      details={"path": path}) from None
    return b"".join(chunks)


def _describe(entry: DatasetEntry, max_pixels: int) -> _ImageRecord | None:
    """The image's facts, or None if it can't be decoded under the pixel cap."""
    try:
        width, height = oriented_size(entry.data, max_pixels)
        # dHash looks at a 9x8 thumbnail: a reduced decode (several times faster on photos) is plenty.
        image = decode_rgb(entry.data, max_pixels, at_least=DHASH_DECODE_SIZE)
        return _ImageRecord(path=entry.path, label=entry.label, sha256=hashlib.sha256(entry.data).hexdigest(),
                            dhash=dhash(image), width=width, height=height)
    # Pillow's plugins raise many exception types on hostile or broken files (decode_rgb maps the
    # usual ones to PerceptError); any of them just means this file can't be used.
    except Exception:
        return None


def _check_classes(classes: dict[str, int], undecodable: int) -> None:
    if not classes:
        raise InvalidDataset(f"None of the {undecodable} files in the zip is a readable image: send JPEG, PNG, "
                             "WebP, BMP, GIF or TIFF files in class folders.", code="empty_dataset")
    if len(classes) < 2:
        only = next(iter(classes))
        raise InvalidDataset(f"Only one class ({only!r}) has readable images: a classifier needs at least 2; "
                             "add readable images to the other class folders.", code="too_few_classes",
                             details={"classes": list(classes)})


def _duplicate_groups(images: list[_ImageRecord]) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """Exact groups (same sha256), near groups (chained dHash matches over 2+ distinct files) and
    the groups of either kind spanning more than one class; each a sorted list of sorted paths."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_sha[image.sha256].append(index)
    exact = [group for group in by_sha.values() if len(group) > 1]
    # Byte-identical files hash alike, so each exact group sits inside one of these components.
    components = _near_components([image.dhash for image in images])
    near = [group for group in components if len({images[i].sha256 for i in group}) > 1]
    cross_class = [group for group in components if len({images[i].label for i in group}) > 1]

    def paths(groups: list[list[int]]) -> list[list[str]]:
        return sorted(sorted(images[i].path for i in group) for group in groups)

    return paths(exact), paths(near), paths(cross_class)


def _near_components(hashes: list[int]) -> list[list[int]]:
    """Indices of `hashes` linked by chains of matches within NEAR_DUPLICATE_MAX_DISTANCE bits; no singletons.

    Pigeonhole: split the 64 bits into distance+1 bands; two hashes within the distance differ in
    at most that many bands, so they agree exactly on at least one. Only hashes sharing a band value
    are compared: 5,000 varied images take ~30 ms instead of ~1.5 s for all 12.5M pairs. The worst
    case (distinct hashes agreeing on most bands, e.g. thousands of nearly flat scans) is still
    pairwise, up to 6 times over: ~4 s for 5,000 such images in CPython; the file cap bounds it.
    """
    by_hash: dict[int, list[int]] = defaultdict(list)
    for index, value in enumerate(hashes):
        by_hash[value].append(index)
    unique = list(by_hash)
    parent = list(range(len(unique)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands = NEAR_DUPLICATE_MAX_DISTANCE + 1
    edges = [round(band * _HASH_BITS / bands) for band in range(bands + 1)]
    for low, high in zip(edges, edges[1:], strict=False):
        mask = (1 << (high - low)) - 1
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, value in enumerate(unique):
            buckets[(value >> low) & mask].append(i)
        for bucket in buckets.values():
            for position, i in enumerate(bucket):
                value = unique[i]
                for j in bucket[position + 1:]:
                    if (value ^ unique[j]).bit_count() <= NEAR_DUPLICATE_MAX_DISTANCE:
                        a, b = root(i), root(j)
                        if a != b:
                            parent[b] = a

    groups: dict[int, list[int]] = defaultdict(list)
    for i, value in enumerate(unique):
        groups[root(i)].extend(by_hash[value])
    return [sorted(group) for group in groups.values() if len(group) > 1]


def _stats(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "max": max(values), "mean": round(fmean(values), 1)}


def _warnings(manifest: _Manifest, classes: dict[str, int], unreadable_classes: list[str], undecodable: int,
              exact_count: int, near_count: int, cross_class: list[list[str]]) -> list[str]:
    warnings: list[str] = []
    if manifest.loose_files:
        count = len(manifest.loose_files)
        warnings.append(f"{_plural(count, 'file')} at the top level {'is' if count == 1 else 'are'} not in a class "
                        f"folder and {'was' if count == 1 else 'were'} ignored (e.g. {manifest.loose_files[0]!r}).")
    if undecodable:
        warnings.append(f"{_plural(undecodable, 'file')} could not be read as images and "
                        f"{'was' if undecodable == 1 else 'were'} skipped; see undecodable.files.")
    for label in unreadable_classes:
        warnings.append(f"class {label!r} has no readable images and was left out.")
    for label, count in classes.items():
        if count < _FEW_IMAGES_PER_CLASS:
            warnings.append(f"class {label!r} has only {_plural(count, 'image')}; add more (with fewer than "
                            f"{_FEW_IMAGES_PER_CLASS}, a train/validation split leaves it nearly empty).")
    largest, smallest = max(classes, key=classes.__getitem__), min(classes, key=classes.__getitem__)
    if classes[largest] >= _IMBALANCE_RATIO * classes[smallest]:
        warnings.append(f"classes are imbalanced: {largest!r} has {classes[largest]} images, {smallest!r} only "
                        f"{classes[smallest]}; add images to the small classes or weight them in training.")
    if exact_count:
        warnings.append(f"{_plural(exact_count, 'image')} {'is a' if exact_count == 1 else 'are'} byte-for-byte "
                        f"{'copy' if exact_count == 1 else 'copies'} of another; see duplicates.exact.")
    if near_count:
        warnings.append(f"{_plural(near_count, 'image')} {'looks' if near_count == 1 else 'look'} nearly identical "
                        "to another (re-encoded or lightly edited); see duplicates.near.")
    if cross_class:
        count = sum(len(group) for group in cross_class)
        warnings.append(f"{count} images appear under more than one class ({_plural(len(cross_class), 'group')}): "
                        "mislabelled copies leak between classes; see duplicates.cross_class.")
    return warnings


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.0f} MB" if size >= 1024 * 1024 else f"{size / 1024:.0f} KB"
