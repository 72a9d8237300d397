"""Decoding at a reduced scale: large JPEGs come back smaller but never under what the caller needs,
oriented as a person sees them; other formats and small images are left as they are."""

import sys
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from percept.errors import PerceptError
from percept.imaging import decode_rgb, inspect_image, oriented_size

MAX_PIXELS = 40_000_000


def photo(width: int, height: int, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    buffer = BytesIO()
    image.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


def test_a_large_jpeg_is_decoded_reduced_but_never_under_the_size_asked():
    data = photo(4000, 3000)
    full = decode_rgb(data, MAX_PIXELS)
    reduced = decode_rgb(data, MAX_PIXELS, at_least=256)
    assert full.size == (4000, 3000)
    assert reduced.size == (500, 375)  # 1/8: the largest reduction keeping both sides >= 256
    assert decode_rgb(data, MAX_PIXELS, at_least=1000).size == (2000, 1500)  # 1/4 would leave 750
    assert oriented_size(data, MAX_PIXELS) == (4000, 3000)


def test_orientation_applies_to_the_reduced_decode_and_to_the_size():
    data = photo(4000, 3000, orientation=6)  # rotated 90 degrees: a portrait photo
    assert decode_rgb(data, MAX_PIXELS, at_least=256).size == (375, 500)
    assert oriented_size(data, MAX_PIXELS) == (3000, 4000)
    assert (inspect_image(data, MAX_PIXELS).width, inspect_image(data, MAX_PIXELS).height) == (3000, 4000)


@pytest.mark.parametrize(("size", "fmt"), [((4000, 3000), "PNG"), ((300, 200), "JPEG")])
def test_other_formats_and_small_images_are_left_whole(size, fmt):
    assert decode_rgb(photo(*size, fmt=fmt), MAX_PIXELS, at_least=256).size == size


def test_a_truncated_photo_is_still_refused_when_checked_at_the_smallest_scale():
    data = photo(2000, 1500)
    with pytest.raises(Exception) as refused:
        inspect_image(data[: int(len(data) * 0.95)], MAX_PIXELS)
    assert getattr(refused.value, "code", None) == "corrupt_image"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "TIFF"])
def test_a_truncated_file_of_any_format_is_a_clean_refusal(fmt):
    """Found by tests/core/test_fuzz_inputs.py: reading a PNG's EXIF orientation decodes the file (its EXIF may
    follow the pixels), and a truncated one raised a bare OSError there (a 500 at the gateway)."""
    data = photo(64, 48, fmt=fmt)
    for cut in (len(data) // 2, len(data) - 8):
        for check in (inspect_image, oriented_size, decode_rgb):
            try:
                check(data[:cut], MAX_PIXELS)
            except PerceptError as exc:
                assert exc.code in ("corrupt_image", "unsupported_image") and 400 <= exc.status < 500
            # (a truncated GIF or TIFF may still yield its first frame)


def test_the_pixel_cap_is_the_callers_and_pillows_own_guard_is_left_alone():
    """Each call checks its own cap on the header; no call re-sets Pillow's process-wide guard, so other
    Pillow users (and other threads) are not held to the last caller's cap."""
    pillows_own = Image.MAX_IMAGE_PIXELS
    data = photo(2000, 1500)  # 3 megapixels
    assert decode_rgb(data, 1_000_000_000).size == (2000, 1500)
    with pytest.raises(Exception) as refused:
        decode_rgb(data, 1_000_000)
    assert Image.MAX_IMAGE_PIXELS == pillows_own
    # Refused by the call's own cap, checked on the header: the answer says the image's size and the cap.
    assert getattr(refused.value, "code", None) == "image_too_many_pixels"
    assert "(2000x1500)" in str(refused.value) and refused.value.details == {"max_pixels": 1_000_000}
    with pytest.raises(Exception) as also_refused:
        inspect_image(data, 2_999_999)
    assert getattr(also_refused.value, "code", None) == "image_too_many_pixels"
    assert inspect_image(data, 3_000_000).width == 2000


def test_two_caps_in_two_threads_each_apply():
    """A gateway serves many requests at once: a small cap in one must never refuse an image in another."""
    data = photo(1200, 1000)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to interleave the two callers

    def decode(cap: int) -> str:
        try:
            decode_rgb(data, cap, at_least=64)
            return "decoded"
        except Exception as exc:
            return getattr(exc, "code", repr(exc))

    try:
        with ThreadPoolExecutor(8) as pool:
            caps = [100_000, 10_000_000] * 100
            answers = list(pool.map(decode, caps))
    finally:
        sys.setswitchinterval(switch)
    assert answers == ["image_too_many_pixels", "decoded"] * 100
