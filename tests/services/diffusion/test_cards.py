"""The grid's contact sheets (services/diffusion/cards.py): where each image lands, failed tiles, labels, and
pixels that are a function of the inputs alone."""

import numpy as np
from PIL import Image

from services.diffusion.cards import (
    BACKGROUND,
    FAILED_TILE,
    LABEL_WIDTH,
    PAD,
    TILE,
    index_sheet,
    style_sheet,
    thumbnail,
)

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 60), (40, 60, 230)
IMAGES_LEFT = PAD + LABEL_WIDTH + PAD  # where the first tile of a row starts


def solid(colour, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def at(sheet: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return sheet.getpixel((x, y))


def dark_pixels(sheet: Image.Image, box: tuple[int, int, int, int]) -> int:
    return int((np.asarray(sheet.crop(box).convert("L")) < 100).sum())


def style_rows():
    return [("a cat", [solid(RED), solid(GREEN)]), ("a lighthouse at dusk", [solid(BLUE), None])]


def test_a_style_sheet_has_a_row_per_subject_and_its_images_across():
    sheet = style_sheet("oil painting", style_rows())

    title = sheet.height - 2 * (TILE + PAD) - PAD
    assert sheet.width == IMAGES_LEFT + 2 * (TILE + PAD)
    centre = TILE // 2
    assert at(sheet, IMAGES_LEFT + centre, title + centre) == RED
    assert at(sheet, IMAGES_LEFT + TILE + PAD + centre, title + centre) == GREEN
    second_row = title + TILE + PAD
    assert at(sheet, IMAGES_LEFT + centre, second_row + centre) == BLUE
    # the failed image: a grey tile with its word on it
    assert at(sheet, IMAGES_LEFT + TILE + PAD + 4, second_row + 4) == FAILED_TILE
    failed_box = (IMAGES_LEFT + TILE + PAD, second_row, IMAGES_LEFT + 2 * TILE + PAD, second_row + TILE)
    assert dark_pixels(sheet, failed_box) > 20


def test_the_labels_and_title_are_drawn():
    sheet = style_sheet("oil painting", style_rows())
    unlabelled = style_sheet("", [("", images) for _, images in style_rows()])

    title_box = (0, 0, sheet.width, PAD + 20)
    label_box = (PAD, sheet.height - 2 * (TILE + PAD) - PAD, PAD + LABEL_WIDTH, sheet.height)
    assert dark_pixels(sheet, title_box) > 50 and dark_pixels(sheet, label_box) > 50
    assert dark_pixels(unlabelled, title_box) == 0 and dark_pixels(unlabelled, label_box) == 0


def test_a_long_label_is_wrapped_within_its_column():
    subject = "a very long subject description that goes on and on about a lighthouse on a cliff at dusk"
    sheet = style_sheet("style", [(subject, [solid(RED)])])

    top = sheet.height - TILE - PAD
    assert dark_pixels(sheet, (PAD, top, PAD + LABEL_WIDTH, top + TILE)) > 100
    gutter = np.asarray(sheet.crop((PAD + LABEL_WIDTH + 1, top, IMAGES_LEFT, top + TILE)))
    assert (gutter == BACKGROUND).all()  # nothing spilled into the images


def test_the_same_inputs_draw_the_same_pixels():
    assert style_sheet("oil", style_rows()).tobytes() == style_sheet("oil", style_rows()).tobytes()
    assert style_sheet("oil", style_rows()).tobytes() != style_sheet("ink", style_rows()).tobytes()


def test_small_images_are_enlarged_sharply_and_others_fitted_with_their_aspect():
    checker = Image.new("RGB", (2, 2), RED)
    checker.putpixel((1, 0), BLUE)

    enlarged = thumbnail(checker)
    wide = thumbnail(solid(GREEN, (256, 128)))

    assert enlarged.size == (TILE, TILE)
    assert at(enlarged, 0, 0) == RED and at(enlarged, TILE - 1, 0) == BLUE  # NEAREST: no blend
    assert at(enlarged, TILE // 2 - 1, 0) == RED and at(enlarged, TILE // 2, 0) == BLUE
    assert at(wide, TILE // 2, TILE // 2) == GREEN
    assert at(wide, TILE // 2, 2) == BACKGROUND  # letterboxed above and below


def test_the_index_sheet_puts_each_cells_first_image_at_its_subject_and_style():
    subjects, styles = ["cat", "dog"], ["oil", "ink", "pixel art"]
    cells = {("cat", "oil"): solid(RED), ("cat", "ink"): solid(GREEN), ("cat", "pixel art"): solid(BLUE),
             ("dog", "oil"): solid(BLUE), ("dog", "ink"): None}  # (dog, pixel art) absent: failed too

    sheet = index_sheet(subjects, styles, cells)

    assert sheet.width == IMAGES_LEFT + 3 * (TILE + PAD)
    header = sheet.height - 2 * (TILE + PAD) - PAD
    def centre(row: int, column: int) -> tuple[int, int, int]:
        return at(sheet, IMAGES_LEFT + column * (TILE + PAD) + TILE // 2, header + row * (TILE + PAD) + TILE // 2)

    assert [centre(0, column) for column in range(3)] == [RED, GREEN, BLUE]
    assert centre(1, 0) == BLUE
    for column in (1, 2):
        corner = (IMAGES_LEFT + column * (TILE + PAD) + 3, header + TILE + PAD + 3)
        assert at(sheet, *corner) == FAILED_TILE
    assert dark_pixels(sheet, (IMAGES_LEFT, 0, sheet.width, header)) > 50  # the styles' names
    assert index_sheet(subjects, styles, cells).tobytes() == sheet.tobytes()
