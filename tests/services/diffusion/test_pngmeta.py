"""Generated images' PNGs (services/diffusion/pngmeta.py): A1111's `parameters`, the `percept` record, and
bytes that depend on the pixels and the record alone."""

import io

import numpy as np
from PIL import Image

from services.diffusion.pngmeta import encode_png, parameters_text, read_parameters, read_png_record

RECORD = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "seed": 123, "steps": 20,
          "guidance_scale": 7.5, "width": 64, "height": 48, "scheduler": "Euler a",
          "model": {"name": "sd15", "version": "2", "sha256": "0123456789abcdef" * 4}}


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_the_same_image_and_record_encode_to_the_same_bytes():
    assert encode_png(picture(), RECORD) == encode_png(picture(), dict(reversed(list(RECORD.items()))))


def test_the_bytes_change_with_the_pixels_and_with_the_record():
    png = encode_png(picture(), RECORD)

    assert encode_png(picture(1), RECORD) != png
    assert encode_png(picture(), {**RECORD, "seed": 124}) != png


def test_the_pixels_survive_exactly():
    png = encode_png(picture(), RECORD)

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(picture()))


def test_the_record_and_parameters_are_read_back():
    png = encode_png(picture(), RECORD)

    assert read_png_record(png) == RECORD
    assert read_parameters(png) == (
        "a red fox in the snow\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, "
        "Size: 64x48, Model hash: 0123456789, Model: sd15, Version: percept")
    # and Pillow (what other tools read with) sees the same chunks
    assert Image.open(io.BytesIO(png)).text["parameters"] == read_parameters(png)


def test_text_beyond_latin_1_round_trips():
    record = {**RECORD, "prompt": "un renard roux ❄ 雪の中の狐", "negative_prompt": None}
    png = encode_png(picture(), record)

    assert read_png_record(png) == record
    assert read_parameters(png).startswith("un renard roux ❄ 雪の中の狐\nSteps: 20,")
    assert "Negative prompt" not in read_parameters(png)


def test_a1111_values_that_would_break_the_line_are_quoted():
    text = parameters_text({**RECORD, "model": {"name": "my, model: v2", "sha256": None}})

    assert text.endswith('Seed: 123, Size: 64x48, Model: "my, model: v2", Version: percept')


def test_a_card_record_has_no_parameters_chunk():
    png = encode_png(picture(), {"card": "index", "subjects": ["a"]})

    assert read_parameters(png) is None
    assert read_png_record(png) == {"card": "index", "subjects": ["a"]}


def test_files_without_a_record_read_as_none():
    plain = io.BytesIO()
    picture().save(plain, format="PNG")
    jpeg = io.BytesIO()
    picture().save(jpeg, format="JPEG")

    assert read_png_record(plain.getvalue()) is None
    assert read_parameters(plain.getvalue()) is None
    assert read_png_record(jpeg.getvalue()) is None
    assert read_png_record(b"") is None
    assert read_png_record(encode_png(picture(), RECORD)[:40]) is None  # cut before the chunk ends
