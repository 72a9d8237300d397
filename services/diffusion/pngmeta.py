"""Generated images as PNG files that carry their own provenance.

A PNG from `encode_png` holds two text chunks before its pixels:
    `parameters`: the generation in AUTOMATIC1111's format, which image viewers, A1111's "PNG Info" tab and
        ComfyUI read:
            a red fox in the snow
            Negative prompt: blurry
            Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x512, Model hash: 0123456789,
            Model: sd15, Version: percept
        (one line after the prompts; written only for a record with a `prompt`, i.e. not for contact sheets).
    `percept`: the whole record as JSON (sorted keys, ASCII), what `read_png_record` returns.
Text that is not Latin-1 goes into an iTXt chunk (UTF-8) instead of tEXt. The bytes are a function of the pixels
and the record alone (no timestamps, no colour profile carried over, a fixed compression level), so rendering
the same image with the same record again gives the same file, byte for byte.
"""

import io
import json
import struct
import zlib
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"
RECORD_KEY = "percept"
# zlib's default trade-off; fixed, so the bytes do not depend on a library default.
COMPRESS_LEVEL = 6
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_TEXT_BYTES = 1024 * 1024  # an inflated iTXt chunk larger than this is not one of ours


def _a1111_value(value: Any) -> str:
    """A1111 quotes a value that would break its `key: value, ...` line."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def parameters_text(record: dict[str, Any]) -> str:
    """The record in AUTOMATIC1111's `parameters` format (fields the record lacks are left out)."""
    lines = [str(record.get("prompt", ""))]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    model = record.get("model") or {}
    fields: list[tuple[str, Any]] = [
        ("Steps", record.get("steps")),
        ("Sampler", record.get("scheduler")),
        ("CFG scale", f"{record['guidance_scale']:g}" if record.get("guidance_scale") is not None else None),
        ("Seed", record.get("seed")),
        ("Size", f"{record['width']}x{record['height']}" if record.get("width") and record.get("height") else None),
        ("Model hash", (model.get("sha256") or "")[:10] or None),
        ("Model", model.get("name")),
        ("Version", "percept"),
    ]
    lines.append(", ".join(f"{key}: {_a1111_value(value)}" for key, value in fields if value is not None))
    return "\n".join(lines)


def encode_png(image: Image.Image, record: dict[str, Any]) -> bytes:
    """The image as PNG with the record in its `percept` chunk (and, for a generation, A1111's `parameters`)."""
    info = PngInfo()
    if "prompt" in record:
        info.add_text(PARAMETERS_KEY, parameters_text(record))  # iTXt when not Latin-1
    info.add_text(RECORD_KEY, json.dumps(record, sort_keys=True, ensure_ascii=True, separators=(",", ":")))
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=COMPRESS_LEVEL, optimize=False, icc_profile=None)
    return buffer.getvalue()


def _text_chunks(data: bytes) -> dict[str, str]:
    """The tEXt, zTXt and iTXt chunks of a PNG, read without decoding its pixels (empty if not a PNG)."""
    if not data.startswith(_PNG_SIGNATURE):
        return {}
    found: dict[str, str] = {}
    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        offset += 12 + length  # length, type, body, crc
        if kind == b"IEND" or len(body) < length:
            break
        try:
            if kind == b"tEXt":
                key, _, value = body.partition(b"\x00")
                found.setdefault(key.decode("latin-1"), value.decode("latin-1"))
            elif kind == b"zTXt":
                key, _, rest = body.partition(b"\x00")
                found.setdefault(key.decode("latin-1"), _inflate(rest[1:]).decode("latin-1"))
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\x00")
                compressed, rest = rest[0], rest[2:]
                _language, _, rest = rest.partition(b"\x00")
                _translated, _, text = rest.partition(b"\x00")
                found.setdefault(key.decode("latin-1"), (_inflate(text) if compressed else text).decode("utf-8"))
        except (IndexError, UnicodeDecodeError, zlib.error, ValueError):
            continue  # a damaged chunk is not metadata we wrote
    return found


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, _MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError("text chunk too large")
    return text


def read_png_record(data: bytes) -> dict[str, Any] | None:
    """The record `encode_png` stored in the PNG, or None (not a PNG, no `percept` chunk, not a JSON object)."""
    text = _text_chunks(data).get(RECORD_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_parameters(data: bytes) -> str | None:
    """The PNG's A1111 `parameters` text, or None."""
    return _text_chunks(data).get(PARAMETERS_KEY)
