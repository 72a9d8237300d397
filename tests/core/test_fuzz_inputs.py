"""Property tests of the parsers that read what users send: image intake (percept.imaging and the gateway's
parameter checks), dataset zips (percept.datasets) and caption files (percept.captions).

Whatever the input, the answer is a result or a PerceptError (which the gateway renders as a 4xx in the API's
error format), never another exception: arbitrary and truncated bytes, corrupt images in odd modes, huge declared
dimensions, hostile zips (path traversal, bombs, symlinks, lying headers, odd names, corrupt archives) and caption
files that are almost right. Derandomized and bounded (max_examples), so the run is the same each time and takes
well under a minute.
"""

import io
import json
import stat
import struct
import zipfile
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

from percept.captions import analyse_caption_dataset, is_caption_dataset, read_caption_dataset
from percept.datasets import DatasetLimits, analyse_dataset, iter_dataset
from percept.errors import ImageTooLarge, InvalidInput, PerceptError
from percept.imaging import decode_rgb, inspect_image, oriented_size
from percept.schemas import CaptionParams, ClassifyParams, FaceIdentifyParams, GenerateParams
from services.gateway.intake import parse_params, validation_message

# Pillow warns about the corrupt EXIF and TIFF tags these tests feed it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MAX_PIXELS = 4_000_000
LIMITS = DatasetLimits(max_zip_bytes=2 * 1024 * 1024, max_uncompressed_bytes=8 * 1024 * 1024, max_files=200,
                       max_image_pixels=MAX_PIXELS)
BOUNDED = settings(derandomize=True, database=None, deadline=None, max_examples=300,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SHORT = settings(BOUNDED, max_examples=80)


def clean(call: Any, *args: Any, **kwargs: Any) -> Any:
    """The call's result, or None when it refused the input with a PerceptError (any other exception fails)."""
    try:
        return call(*args, **kwargs)
    except PerceptError as exc:
        assert 400 <= exc.status < 500 and exc.code and exc.message, exc
        return None


# --- images --------------------------------------------------------------------------------------------

MAGIC = [b"", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM",
         b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF\x00\x00\x00\x00WEBPVP8L"]
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "I;16B", "F", "LAB", "HSV"]
FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]


def check_image(data: bytes) -> None:
    """Every entry point either describes/decodes the bytes consistently or refuses them cleanly."""
    facts = clean(inspect_image, data, MAX_PIXELS)
    size = clean(oriented_size, data, MAX_PIXELS)
    for at_least in (None, 64):
        image = clean(decode_rgb, data, MAX_PIXELS, at_least=at_least)
        if image is not None:
            assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
            if at_least is None and facts is not None:
                assert (image.width, image.height) == (facts.width, facts.height)
    if facts is not None:
        assert size == (facts.width, facts.height) and facts.bytes == len(data)


@BOUNDED
@given(st.sampled_from(MAGIC), st.binary(max_size=600))
@example(b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\rIHDR\x7f\xff\xff\xff\x7f\xff\xff\xff\x08\x02\x00\x00\x00")
def test_arbitrary_bytes_are_an_image_or_a_clean_error(magic: bytes, tail: bytes) -> None:
    check_image(magic + tail)


@st.composite
def saved_images(draw: st.DrawFn) -> bytes:
    """A small image in one of Pillow's modes, saved in one of the accepted formats (when that format takes it)."""
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    image = Image.frombytes(mode, (width, height), draw(st.binary(min_size=4096, max_size=4096)) * 8) \
        if mode not in ("P", "PA") else Image.new(mode, (width, height), draw(st.integers(0, 255)))
    out = io.BytesIO()
    save: dict[str, Any] = {}
    if fmt == "JPEG" and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 65535))  # orientation, valid (1-8) or not
        save["exif"] = exif
    try:
        image.save(out, fmt, **save)
    except (OSError, ValueError, KeyError, TypeError):  # this format cannot hold this mode
        reject()
    return out.getvalue()


@BOUNDED
@given(saved_images())
def test_images_in_every_mode_and_format_decode_to_rgb(data: bytes) -> None:
    assert inspect_image(data, MAX_PIXELS).bytes == len(data)
    assert decode_rgb(data, MAX_PIXELS).mode == "RGB"
    check_image(data)


@BOUNDED
@given(saved_images(), st.data())
def test_truncated_and_corrupted_images_are_a_clean_error(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(0, len(data)))
    check_image(data[:cut])
    flips = draw.draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=8))
    corrupted = bytearray(data)
    for index, xor in flips:
        corrupted[index] ^= xor
    check_image(bytes(corrupted))


def png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


@BOUNDED
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1), st.sampled_from(["PNG", "GIF", "BMP"]))
def test_huge_declared_dimensions_are_refused_from_the_header(width: int, height: int, fmt: str) -> None:
    if fmt == "PNG":
        data = png_header(width, height)
    elif fmt == "GIF":
        width, height = width % 65536 or 1, height % 65536 or 1
        data = (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
                + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;")
    else:
        width, height = width % 2**31 or 1, height % 2**31 or 1
        data = (b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24,
                                                                         0, 0, 0, 0, 0, 0) + b"\x00" * 64)
    if width * height > MAX_PIXELS:
        for call in (inspect_image, oriented_size, decode_rgb):
            try:
                call(data, MAX_PIXELS)
            except ImageTooLarge as exc:
                assert exc.code == "image_too_many_pixels"
            else:
                raise AssertionError(f"{call.__name__} took a {width}x{height} {fmt}")
    else:
        check_image(data)


# --- the gateway's parameter checks ---------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
PARAM_NAMES = ["model", "top_k", "expected_label", "unknown_threshold", "reuse", "beam_width", "num_captions",
               "max_length", "min_length", "length_penalty", "collection", "threshold", "prompt", "seed", "steps",
               "width", "height", "num_images", "guidance_scale", "scheduler"]


@BOUNDED
@given(st.sampled_from([ClassifyParams, CaptionParams, FaceIdentifyParams, GenerateParams]),
       st.dictionaries(st.sampled_from(PARAM_NAMES) | st.text(max_size=10), JSON | st.text(), max_size=6))
def test_job_parameters_are_valid_or_a_422_that_names_them(model: Any, raw: dict[str, Any]) -> None:
    try:
        params = parse_params(model, raw)
    except InvalidInput as exc:
        assert exc.status == 422 and exc.code == "invalid_parameters" and exc.details["errors"]
        json.dumps(exc.to_dict())  # renderable
    else:
        assert isinstance(params, model)


@BOUNDED
@given(st.lists(st.fixed_dictionaries({}, optional={"loc": st.lists(st.text(max_size=6) | st.integers(), max_size=4),
                                                    "msg": st.text(max_size=30), "type": st.text(max_size=12)})))
@example([{"loc": ["top_k"], "msg": ""}])  # an IndexError in validation_message before
def test_any_validation_error_list_gives_a_message(errors: list[dict[str, Any]]) -> None:
    message, details = validation_message(errors)
    assert message.startswith("Invalid parameters") and len(details) == len(errors)


# --- dataset zips --------------------------------------------------------------------------------------

def tiny_jpeg(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 10), (shade, 255 - shade, shade // 2)).save(out, "JPEG")
    return out.getvalue()


HOSTILE_NAMES = ["../evil.jpg", "cats/../../evil.jpg", "/etc/passwd", "C:\\win.jpg", "cats\\..\\..\\x.jpg",
                 "cats/a\x00.jpg", "", ".", "cats/", "cats//b.jpg", "./dogs/c.jpg", "__MACOSX/cats/._a.jpg",
                 "cats/.DS_Store", "Thumbs.db", "dogs/" + "d" * 300 + ".jpg", "cats/\u202ekcod.jpg", "cats/é.jpg",
                 "dogs/a.jpg", "dogs/a.jpg", "birds/a/b/c.jpg", "captions.jsonl", "Flickr8k.token.txt"]
NAMES = st.sampled_from(HOSTILE_NAMES) | st.builds("{}/{}.jpg".format, st.sampled_from(["cats", "dogs", "x"]),
                                                   st.text(max_size=8))


@st.composite
def zips(draw: st.DrawFn) -> bytes:
    """An archive of images, junk and caption-ish files under hostile names; some entries symlinks, some
    compressed with methods nobody supports, some encrypted-flagged; the whole possibly cut or corrupted."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for index in range(draw(st.integers(0, 8))):
            name = draw(NAMES)
            info = zipfile.ZipInfo(name or f"e{index}")
            info.compress_type = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                                       zipfile.ZIP_LZMA]))
            kind = draw(st.sampled_from(["image", "image", "junk", "symlink", "text"]))
            if kind == "symlink":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            data = {"image": tiny_jpeg(index * 30 % 256), "junk": draw(st.binary(max_size=200)),
                    "symlink": b"../../etc/passwd", "text": draw(st.text(max_size=200)).encode()}[kind]
            archive.writestr(info, data)
    data = bytearray(out.getvalue())
    damage = draw(st.sampled_from(["none", "none", "cut", "flip", "encrypt", "method"]))
    if damage == "cut" and data:
        data = data[:draw(st.integers(0, len(data)))]
    elif damage == "flip" and data:
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif damage in ("encrypt", "method"):
        # Patch every central-directory record: flag bit 0 (encrypted), or compression method 99 (AES).
        at = data.find(b"PK\x01\x02")
        while at >= 0:
            if damage == "encrypt":
                data[at + 8] |= 0x1
            else:
                data[at + 10:at + 12] = struct.pack("<H", 99)
            at = data.find(b"PK\x01\x02", at + 4)
    return bytes(data)


def read_every_way(data: bytes) -> None:
    clean(analyse_dataset, data, LIMITS)
    clean(lambda: [entry.data for entry in iter_dataset(data, LIMITS)])
    if clean(is_caption_dataset, data, LIMITS):
        clean(analyse_caption_dataset, data, LIMITS)
        clean(read_caption_dataset, data, LIMITS)


@BOUNDED
@given(zips())
def test_hostile_zips_are_read_or_refused_cleanly(data: bytes) -> None:
    read_every_way(data)


@SHORT
@given(st.binary(max_size=400), st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06" + b"\x00" * 18, b"PK\x01\x02"]))
def test_arbitrary_bytes_are_not_a_zip(tail: bytes, magic: bytes) -> None:
    read_every_way(magic + tail)


def deflated(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


@SHORT
@given(st.integers(2, 7), st.sampled_from(["declared", "inflated"]))
def test_zip_bombs_and_lying_sizes_are_refused(megabytes: int, how: str) -> None:
    members = {"cats/a.jpg": tiny_jpeg(10), "dogs/b.jpg": tiny_jpeg(200), "dogs/bomb.jpg": b"\x00" * (megabytes << 20)}
    data = bytearray(deflated(members))
    if how == "declared":
        # The bomb's central-directory record claims it is 100 bytes: reading it past that is refused.
        at = data.rfind(b"PK\x01\x02")
        data[at + 24:at + 28] = struct.pack("<I", 100)
    try:
        analyse_dataset(bytes(data), LIMITS)
    except PerceptError as exc:
        assert exc.status in (413, 415, 422) and exc.code in ("zip_too_large", "not_a_zip"), exc
    else:
        raise AssertionError("a zip bomb was analysed")


# --- caption files -------------------------------------------------------------------------------------

LINE = st.text(st.characters(codec="utf-8"), max_size=40)


@st.composite
def caption_files(draw: st.DrawFn) -> tuple[str, bytes]:
    layout = draw(st.sampled_from(["flickr8k", "coco", "jsonl", "csv"]))
    name = {"flickr8k": "Flickr8k.token.txt", "coco": "annotations/captions_train2017.json",
            "jsonl": "captions.jsonl", "csv": "captions.csv"}[layout]
    image_names = st.sampled_from(["a.jpg", "b.jpg", "imgs/a.jpg", "../a.jpg", "", 5, None]) | LINE
    if layout == "flickr8k":
        lines = draw(st.lists(st.builds("{}#{}\t{}".format, image_names, st.sampled_from(["0", "1", "x", ""]), LINE)
                              | LINE, max_size=6))
        text = "\n".join(lines)
    elif layout == "coco":
        images = draw(st.lists(st.fixed_dictionaries({"id": JSON | st.integers(0, 3), "file_name": image_names | JSON}),
                               max_size=4))
        annotations = draw(st.lists(st.fixed_dictionaries({"image_id": st.integers(0, 3) | JSON,
                                                           "caption": LINE | JSON}), max_size=6))
        document = draw(st.sampled_from([{"images": images, "annotations": annotations}, images, {"images": images}]))
        text = json.dumps(document)
    elif layout == "jsonl":
        records = draw(st.lists(st.fixed_dictionaries(
            {"image": image_names | JSON},
            optional={"captions": st.lists(LINE, max_size=3) | JSON, "split": st.sampled_from(["train", "dev", "x"])
                      | JSON}) | JSON, max_size=6))
        text = "\n".join(json.dumps(record) for record in records)
    else:
        header = draw(st.sampled_from(["image,caption", "image,caption,split", "caption", "image,caption,image", ""]))
        rows = draw(st.lists(st.lists(LINE | image_names.map(str), max_size=4).map(",".join), max_size=6))
        text = "\n".join([header, *rows])
    text = draw(st.sampled_from([text, text, "[" * 5000 + "]" * 5000, text + '\n"unclosed', text[: len(text) // 2]]))
    encoded = text.encode("utf-8", "surrogatepass")
    return name, draw(st.sampled_from([encoded, encoded, b"\xff\xfe" + encoded, encoded.replace(b"a", b"\x00")]))


@BOUNDED
@given(caption_files(), st.booleans())
@example(("captions.csv", b"image,caption\n" + b'"' + b"x" * 200_000 + b'",a'), False)
@example(("captions.csv", b"x" * 200_000 + b",image,caption\na.jpg,a cat"), False)
@example(("annotations/captions_train2017.json", b'{"images": [{"id": 1, "file_name": 7}], '
                                                 b'"annotations": [{"image_id": 1, "caption": "a cat"}]}'), False)
@example(("captions.jsonl", b'{"image": "a.jpg", "captions": ["a cat"], "split": ["train"]}'), False)
@example(("annotations/captions_train2017.json", b"[" * 100_000 + b"]" * 100_000), False)
def test_caption_files_are_read_or_refused_cleanly(caption_file: tuple[str, bytes], nested: bool) -> None:
    name, text = caption_file
    folder = "data/" if nested else ""
    data = deflated({folder + name: text, folder + "a.jpg": tiny_jpeg(40), folder + "imgs/a.jpg": tiny_jpeg(90),
                     folder + "b.jpg": b"not an image"})
    report = clean(analyse_caption_dataset, data, LIMITS)
    if report is not None:
        assert report["num_images"] >= 1 and report["num_captions"] >= 1
    images = clean(read_caption_dataset, data, LIMITS)
    if images is not None:
        assert all(image.captions for image in images)
