"""Image intake shared by the gateway (inspect before storing) and the workers (decode for a model).

Pillow only reads the header on open, so the pixel cap is checked before any pixel is decoded: a
decompression bomb is refused, never allocated. The cap is each caller's own (an argument), never
Pillow's process-wide `Image.MAX_IMAGE_PIXELS`: the gateway decodes for many requests at once.
"""

import hashlib
import warnings
from dataclasses import dataclass
from io import BytesIO

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from percept.errors import ImageTooLarge, InvalidImage

# Pillow format name -> content type. MPO is what many phone cameras write: a JPEG with extra frames.
ACCEPTED_FORMATS = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
}
ACCEPTED_NAMES = "JPEG, PNG, WebP, BMP, GIF or TIFF"
# Pillow opens MPO through its JPEG plugin.
OPENERS = [name for name in ACCEPTED_FORMATS if name != "MPO"]
# EXIF orientations 5-8 rotate by 90 degrees: width and height swap once applied.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's own bomb guard (its default, warning over 89 MP and refusing over 179 MP) stays as a backstop;
# it is one process-wide number, so it is left alone and each call checks its own cap on the header.
# Its warning only repeats what that check says; silenced once here (catch_warnings per call is not
# thread-safe).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    format: str
    content_type: str
    width: int  # after EXIF orientation
    height: int
    bytes: int


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise InvalidImage("The image is empty: send the file's bytes.", code="empty_image", status=400)
    try:
        image = Image.open(BytesIO(data), formats=OPENERS)  # the header only
    except Image.DecompressionBombError:  # past Pillow's backstop (twice its limit), whatever the cap
        raise _too_many_pixels(None, min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidImage(f"The file is not a readable image: send a {ACCEPTED_NAMES} file.",
                           code="unsupported_image") from None
    if image.width * image.height > max_pixels:
        raise _too_many_pixels(image, max_pixels)
    if image.width < 1 or image.height < 1:
        raise InvalidImage("The image has no pixels.", code="corrupt_image", status=422)
    return image


def _too_many_pixels(image: Image.Image | None, max_pixels: int) -> ImageTooLarge:
    size = f" ({image.width}x{image.height})" if image is not None else ""
    return ImageTooLarge(
        f"The image has too many pixels{size}: the limit is {max_pixels / 1e6:g} megapixels; resize it.",
        code="image_too_many_pixels", details={"max_pixels": max_pixels})


def _load(image: Image.Image, max_pixels: int) -> None:
    try:
        image.load()  # the first frame of a GIF, TIFF or MPO
    except Image.DecompressionBombError:  # a frame larger than its header said, past Pillow's backstop
        raise _too_many_pixels(image, max_pixels) from None
    except _DECODE_ERRORS as exc:
        raise _corrupt(exc) from None


# What Pillow's decoders raise on a broken file (each plugin has its own habits).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def _corrupt(exc: Exception) -> InvalidImage:
    return InvalidImage(f"The image is corrupt or truncated ({exc}); send the complete file.",
                        code="corrupt_image", status=422)


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size once EXIF orientation is applied, from the header (before any reduced decode)."""
    width, height = image.size
    try:
        # A PNG may keep its EXIF after the pixels: reading it then decodes the file, which can fail.
        orientation = image.getexif().get(0x0112)
    except _DECODE_ERRORS as exc:
        raise _corrupt(exc) from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height


def _reduce(image: Image.Image, at_least: int) -> None:
    """Decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) while both sides stay >= at_least.

    All of the file is still read and checked; only the inverse transforms get smaller, which makes a
    camera photo decode several times faster. Other formats decode as they are.
    """
    image.draft(image.mode, (at_least, at_least))


def inspect_image(data: bytes, max_pixels: int) -> ImageFacts:
    """Validate an upload fully (every byte is decoded once, at the smallest scale) and describe it."""
    facts = describe_image(data, max_pixels)
    check_pixels(data, max_pixels)
    return facts


def describe_image(data: bytes, max_pixels: int) -> ImageFacts:
    """An upload described from its header (the pixel cap checked, EXIF orientation applied) and its sha256; no
    pixel is decoded, so a corrupt or truncated file passes: check_pixels says that."""
    image = _open(data, max_pixels)
    width, height = _oriented_size(image)
    fmt = image.format or "unknown"
    return ImageFacts(sha256=hashlib.sha256(data).hexdigest(), format=fmt,
                      content_type=ACCEPTED_FORMATS[fmt], width=width, height=height, bytes=len(data))


def check_pixels(data: bytes, max_pixels: int) -> None:
    """Decode every byte of the image once, at the smallest scale; InvalidImage if it is corrupt or truncated."""
    image = _open(data, max_pixels)
    _reduce(image, 1)
    _load(image, max_pixels)


def oriented_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Width and height as a person sees the image (EXIF orientation applied), from the header only."""
    return _oriented_size(_open(data, max_pixels))


def decode_rgb(data: bytes, max_pixels: int, at_least: int | None = None) -> Image.Image:
    """An RGB image as a person sees it: EXIF orientation applied, first frame, alpha on white.

    `at_least`: the caller needs no more than this many pixels on each side, so a large JPEG may come
    back smaller (by a power of two, never under `at_least`), decoded that much faster.
    """
    image = _open(data, max_pixels)
    if at_least is not None:
        _reduce(image, at_least)
    _load(image, max_pixels)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "I;16" or image.mode == "I":
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")
