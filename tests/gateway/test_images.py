"""Image intake over HTTP: every accepted format, EXIF orientation, and every hostile input refused."""

import struct
import zlib
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from tests.conftest import image_bytes

pytestmark = pytest.mark.integration


def _rgb(width=64, height=48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


ACCEPTED = {
    "jpeg": (lambda: image_bytes(_rgb(), "JPEG"), "JPEG"),
    "png": (lambda: image_bytes(_rgb(), "PNG"), "PNG"),
    "webp": (lambda: image_bytes(_rgb(), "WEBP"), "WEBP"),
    "bmp": (lambda: image_bytes(_rgb(), "BMP"), "BMP"),
    "gif": (lambda: image_bytes(_rgb().convert("P"), "GIF"), "GIF"),
    "tiff": (lambda: image_bytes(_rgb(), "TIFF"), "TIFF"),
    "cmyk-jpeg": (lambda: image_bytes(_rgb().convert("CMYK"), "JPEG"), "JPEG"),
    "palette-png": (lambda: image_bytes(_rgb().convert("P"), "PNG"), "PNG"),
    "rgba-png": (lambda: image_bytes(_rgb().convert("RGBA"), "PNG"), "PNG"),
    "grey-png": (lambda: image_bytes(_rgb().convert("L"), "PNG"), "PNG"),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_every_accepted_format_is_stored_and_classified(api, name):
    make, fmt = ACCEPTED[name]
    data = make()
    response = api.post("/v1/images", files={"file": (f"x.{name}", data)})
    assert response.status_code == 201, response.text
    image = response.json()
    assert image["format"] == fmt and (image["width"], image["height"]) == (64, 48)
    assert api.get(f"/v1/images/{image['id']}/content").content == data
    job = api.post("/v1/classify", json={"image": image["id"], "top_k": 1}, headers={"Prefer": "wait=30"}).json()
    assert job["status"] == "succeeded", job
    assert len(job["output"]["labels"]) == 1


def test_same_bytes_same_tenant_same_id(api, platform):
    data = image_bytes(_rgb(), "PNG")
    first = api.post("/v1/images", files={"file": ("a.png", data)}).json()
    second = api.post("/v1/images", files={"file": ("b.png", data)}).json()
    assert first["id"] == second["id"] and first["sha256"] == second["sha256"]
    with platform.client(platform.new_key()) as other:
        theirs = other.post("/v1/images", files={"file": ("a.png", data)}).json()
    assert theirs["id"] != first["id"]


def test_exif_orientation_is_applied(api):
    image = _rgb(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    response = api.post("/v1/images", files={"file": ("r.jpg", image_bytes(image, "JPEG", exif=exif))})
    assert response.status_code == 201
    assert (response.json()["width"], response.json()["height"]) == (48, 64)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims huge dimensions: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    data = image_bytes(_rgb(256, 256), "JPEG")
    return data[: len(data) // 2]


HOSTILE = {
    "empty file": (lambda: b"", 400, "empty_image"),
    "text file": (lambda: b"hello, this is not an image" * 10, 415, "unsupported_image"),
    "pdf": (lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415, "unsupported_image"),
    "truncated jpeg": (_truncated_jpeg, 422, "corrupt_image"),
    # A 500 until the fuzz found it: reading a PNG's EXIF orientation decodes the file.
    "truncated png": (lambda: image_bytes(_rgb(64, 64), "PNG")[:-40], 422, "corrupt_image"),
    "decompression bomb": (lambda: _png_header_only(50_000, 50_000), 413, "image_too_many_pixels"),
    "just over the pixel cap": (lambda: _png_header_only(2001, 2001), 413, "image_too_many_pixels"),
    "too many bytes": (lambda: b"\xff\xd8" + bytes(3 * 1024 * 1024), 413, "request_too_large"),
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 415,
            "unsupported_image"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_uploads_get_a_clear_4xx(api, name):
    make, status, code = HOSTILE[name]
    for path, field in (("/v1/images", "file"), ("/v1/classify", "image")):
        response = api.post(path, files={field: ("x", make())})
        assert response.status_code == status, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == code and len(error["message"]) > 10
    assert api.get("/healthz").status_code == 200


def test_a_corrupt_upload_is_said_before_a_later_input_error_and_leaves_no_image(api):
    """An upload's pixels are checked on a thread while its row is written: a truncated first image is still what
    the request is told about, before the second image's own error, and its row is rolled back with the request."""
    response = api.post("/v1/faces/verify", files={"image_a": ("a.jpg", _truncated_jpeg())},
                        data={"image_b": "img_no_such_image"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "corrupt_image"
    response = api.post("/v1/faces/verify", files={"image_a": ("a.jpg", image_bytes(_rgb(), "JPEG"))},
                        data={"image_b": "img_no_such_image"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "image_not_found"
    # neither request left an image row: each went with its request's error
    assert [image["sha256"] for image in api.get("/v1/images").json()["data"]] == []


def test_image_just_over_byte_cap_inside_body_limit(api):
    # 2 MB + a little: under the request cap (which allows multipart overhead), over the image cap.
    data = BytesIO(b"\x89PNG" + bytes(2 * 1024 * 1024 + 100))
    response = api.post("/v1/images", files={"file": ("big.png", data)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"


BAD_PARAMS = {
    "top_k zero": ({"top_k": "0"}, 422, "invalid_parameters"),
    "top_k not a number": ({"top_k": "many"}, 422, "invalid_parameters"),
    "threshold above 1": ({"unknown_threshold": "1.5"}, 422, "invalid_parameters"),
    "unknown parameter": ({"colour": "blue"}, 422, "invalid_parameters"),
    "unknown model": ({"model": "no-such-model"}, 404, "model_not_found"),
    "unknown model version": ({"model": "imagenet-efficientnet-lite0:99"}, 404, "model_version_not_found"),
}


@pytest.mark.parametrize("name", BAD_PARAMS)
def test_bad_parameters_get_a_clear_4xx(api, coffee_jpeg, name):
    fields, status, code = BAD_PARAMS[name]
    response = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, data=fields)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_requests_without_a_usable_image(api):
    missing = api.post("/v1/classify", data={"top_k": "3"})
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "missing_image"
    unknown = api.post("/v1/classify", json={"image": "img_doesnotexist"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "image_not_found"
    not_json = api.post("/v1/classify", content=b"{oops", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    plain = api.post("/v1/classify", content=b"raw bytes", headers={"Content-Type": "image/jpeg"})
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
