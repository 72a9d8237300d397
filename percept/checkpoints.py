"""Checkpoint directories uploaded as zips (a model import), unpacked safely: the core's, since every service
that imports checkpoints (image-to-text, text-to-image) reads them the same way.

The archive is untrusted. Its central directory is checked before anything is inflated (relative paths only, no
links, no encryption, file count, declared unpacked size, compression ratio), and each member is then unpacked
with a budget of its declared size, so a lying header cannot inflate past it. Errors are ValueErrors whose
message starts with the job error code: `[not_a_zip]`, `[unsafe_zip_path]` or `[invalid_checkpoint]`.
"""

import io
import stat
import zipfile
import zlib
from pathlib import Path

# The archive: a real checkpoint directory has a handful of files; weights barely compress (random-looking
# floats), so a member that would inflate 100 times is a zip bomb, not a checkpoint.
MAX_FILES = 1000
MAX_UNPACKED_BYTES = 16 * 1024**3
MAX_COMPRESSION_RATIO = 100.0
_RATIO_CHECK_MIN_BYTES = 1024 * 1024
_COPY_CHUNK = 1024 * 1024
_SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# Written by macOS Finder and Windows Explorer; never part of a checkpoint.
_SYSTEM_FOLDERS = {"__MACOSX"}
_SYSTEM_FILES = {"Thumbs.db", "desktop.ini"}


def invalid_checkpoint(sentence: str) -> ValueError:
    return ValueError(f"[invalid_checkpoint] {sentence}")

def _safe_parts(name: str) -> list[str]:
    """The member's path components, or ValueError if it could point outside the directory."""
    path = name.replace("\\", "/")  # some Windows tools write `\`: read it as a separator, so `..\x` is caught
    parts = path.split("/")
    if "\x00" in name or path.startswith("/") or (len(path) > 1 and path[1] == ":") or ".." in parts:
        raise ValueError(f"[unsafe_zip_path] The zip contains an unsafe path ({name!r}): entries must be relative "
                         "paths inside the checkpoint directory, e.g. config.json.")
    return [part for part in parts if part not in ("", ".")]


def _checked_members(archive: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """Every file of the archive with its path, after the checks that need no inflating."""
    files: list[tuple[zipfile.ZipInfo, list[str]]] = []
    declared_total = 0
    for info in archive.infolist():
        parts = _safe_parts(info.orig_filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ValueError(f"[unsafe_zip_path] The zip contains a symbolic link ({info.orig_filename!r}): zip the "
                             "files themselves, not links to them.")
        if info.is_dir() or info.orig_filename.endswith("\\") or not parts:
            continue
        if any(part.startswith(".") or part in _SYSTEM_FOLDERS for part in parts) or parts[-1] in _SYSTEM_FILES:
            continue  # .gitattributes, .DS_Store, __MACOSX/...: not the checkpoint's
        if info.flag_bits & 0x1:
            raise invalid_checkpoint(f"The zip is password-protected ({info.orig_filename!r} is encrypted); zip the "
                                     "checkpoint again without a password.")
        if info.compress_type not in _SUPPORTED_METHODS:
            raise invalid_checkpoint(f"{info.orig_filename!r} uses an unsupported compression method "
                                     f"({info.compress_type}); zip the checkpoint again with deflate.")
        if info.file_size > _RATIO_CHECK_MIN_BYTES and info.file_size / max(info.compress_size, 1) > \
                MAX_COMPRESSION_RATIO:
            raise invalid_checkpoint(f"{info.orig_filename!r} would inflate more than {MAX_COMPRESSION_RATIO:g} "
                                     "times; this looks like a zip bomb, not a checkpoint.")
        declared_total += info.file_size
        files.append((info, parts))
        if len(files) > MAX_FILES:
            raise invalid_checkpoint(f"The zip holds more than {MAX_FILES} files; a checkpoint directory has a few "
                                     "(config, weights, tokenizer and preprocessor files).")
        if declared_total > MAX_UNPACKED_BYTES:
            raise invalid_checkpoint(f"The zip would unpack to more than {MAX_UNPACKED_BYTES // 1024**3} GiB.")
    return files


# What a Hugging Face `save_pretrained` directory holds beside its weights, by default.
HF_CONTENTS = "config.json, the weights, preprocessor_config.json and the tokenizer files"


def unpack_checkpoint(archive_bytes: bytes, into: Path, *, marker: str = "config.json",
                      contents: str = HF_CONTENTS) -> list[str]:
    """Unpack the checkpoint directory of the zip (the one holding `marker`, e.g. `config.json` or a diffusers
    pipeline's `model_index.json`, at the zip's top level or in its one top folder) into `into`; returns its
    files' paths, relative to the checkpoint directory, sorted. `contents` names what the directory should hold,
    for the error that finds no marker."""
    # 1. The central directory, and every entry checked before anything is inflated
    try:
        archive = zipfile.ZipFile(io.BytesIO(archive_bytes))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise ValueError("[not_a_zip] The upload is not a readable zip archive: zip the checkpoint directory "
                         "that `save_pretrained` wrote.") from None
    with archive:
        files = _checked_members(archive)

        # 2. The checkpoint directory: the marker at the top, or in the zip's one top folder
        tops = {parts[0] for _, parts in files}
        depth = 0 if any(parts == [marker] for _, parts in files) else 1 if len(tops) == 1 else -1
        if depth < 0 or not any(parts[depth:] == [marker] for _, parts in files):
            raise invalid_checkpoint(f"The zip has no {marker} at its top level (nor in a single top folder): "
                                     f"zip the directory that `save_pretrained` wrote ({contents}).")

        # 3. Each file, read with a budget of its declared size (a lying header cannot inflate past it)
        names = []
        for info, parts in files:
            relative = parts[depth:]
            if not relative:
                continue
            target = into.joinpath(*relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as source, target.open("wb") as sink:
                    left = info.file_size
                    while chunk := source.read(min(_COPY_CHUNK, left + 1)):
                        left -= len(chunk)
                        if left < 0:
                            raise invalid_checkpoint(f"{info.orig_filename!r} is larger than its zip entry says.")
                        sink.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
                raise ValueError(f"[not_a_zip] {info.orig_filename!r} in the zip is corrupt ({exc}); zip the "
                                 "checkpoint again.") from None
            names.append("/".join(relative))
    return sorted(names)


