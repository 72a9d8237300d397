"""Contact sheets of a grid job, drawn with PIL alone (no torch: the grid's parent job runs without a model).

`style_sheet`: one style, a row per subject (its label on the left, its images across), the style as the title.
`index_sheet`: every cell at a glance, subjects down and styles across, the first image of each cell.
Images are shown as fixed-size tiles (fitted, centred; small images are enlarged with NEAREST so their pixels
stay sharp); a missing image (a failed cell) is a grey tile saying "failed". The same inputs draw the same
pixels, so a grid's cards are as reproducible as its images.
"""

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

TILE = 128  # px, each side of an image's tile
PAD = 8
LABEL_WIDTH = 160  # the subjects' column
HEADER_HEIGHT = 56  # the index sheet's row of style names: two lines
LABEL_FONT_SIZE = 14
TITLE_FONT_SIZE = 22
BACKGROUND = (255, 255, 255)
INK = (24, 24, 24)
FAILED_TILE = (190, 190, 190)
FAILED_INK = (90, 90, 90)
_ELLIPSIS = "…"

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def thumbnail(image: Image.Image, tile: int = TILE) -> Image.Image:
    """The image fitted into a tile x tile square (aspect kept, centred on the background)."""
    image = image.convert("RGB")
    scale_up = image.width < tile and image.height < tile
    fitted = ImageOps.contain(image, (tile, tile),
                              method=Image.Resampling.NEAREST if scale_up else Image.Resampling.LANCZOS)
    square = Image.new("RGB", (tile, tile), BACKGROUND)
    square.paste(fitted, ((tile - fitted.width) // 2, (tile - fitted.height) // 2))
    return square


def failed_tile(tile: int = TILE) -> Image.Image:
    square = Image.new("RGB", (tile, tile), FAILED_TILE)
    draw = ImageDraw.Draw(square)
    draw.text((tile / 2, tile / 2), "failed", fill=FAILED_INK, font=_font(LABEL_FONT_SIZE + 2), anchor="mm")
    return square


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """Words wrapped to `width` px, at most `max_lines` lines (the last cut with an ellipsis); a word longer than
    a line is cut too."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    for index, line in enumerate(lines):
        ends_cut = cut and index == len(lines) - 1
        if draw.textlength(line, font=font) <= width and not ends_cut:
            continue
        while line and draw.textlength(line + _ELLIPSIS, font=font) > width:
            line = line[:-1]
        lines[index] = line + _ELLIPSIS
    return lines


def _label(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int], font: Font,
           centred: bool = False) -> None:
    """Text wrapped into the box, vertically centred (and horizontally when `centred`)."""
    left, top, right, bottom = box
    line_height = int(font.size * 1.25) if isinstance(font, ImageFont.FreeTypeFont) else 12
    lines = _wrap(draw, text, font, right - left, max(1, (bottom - top) // line_height))
    y = top + ((bottom - top) - line_height * len(lines)) // 2
    for line in lines:
        x = (left + right) / 2 if centred else left
        draw.text((x, y), line, fill=INK, font=font, anchor="ma" if centred else "la")
        y += line_height


def _tile(image: Image.Image | None, tile: int) -> Image.Image:
    return failed_tile(tile) if image is None else thumbnail(image, tile)


def style_sheet(style: str, rows: Sequence[tuple[str, Sequence[Image.Image | None]]], tile: int = TILE
                ) -> Image.Image:
    """One style's sheet: a row per (subject, images), the subject's label on the left, its images across
    (None: a failed image), the style as the title."""
    columns = max([len(images) for _, images in rows] + [1])
    title_height = int(TITLE_FONT_SIZE * 1.25) + 2 * PAD
    width = PAD + LABEL_WIDTH + PAD + columns * (tile + PAD)
    height = title_height + len(rows) * (tile + PAD) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _label(draw, style, (PAD, PAD, width - PAD, title_height - PAD), _font(TITLE_FONT_SIZE))
    label_font = _font(LABEL_FONT_SIZE)
    for row, (subject, images) in enumerate(rows):
        top = title_height + row * (tile + PAD)
        _label(draw, subject, (PAD, top, PAD + LABEL_WIDTH, top + tile), label_font)
        for column, image in enumerate(images):
            sheet.paste(_tile(image, tile), (PAD + LABEL_WIDTH + PAD + column * (tile + PAD), top))
    return sheet


def index_sheet(subjects: Sequence[str], styles: Sequence[str],
                cells: dict[tuple[str, str], Image.Image | None], tile: int = TILE) -> Image.Image:
    """Every cell of the grid: subjects down, styles across, each cell's first image (None or absent: failed)."""
    width = PAD + LABEL_WIDTH + PAD + len(styles) * (tile + PAD)
    height = HEADER_HEIGHT + len(subjects) * (tile + PAD) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(LABEL_FONT_SIZE)
    for column, style in enumerate(styles):
        left = PAD + LABEL_WIDTH + PAD + column * (tile + PAD)
        _label(draw, style, (left, PAD, left + tile, HEADER_HEIGHT - PAD), font, centred=True)
    for row, subject in enumerate(subjects):
        top = HEADER_HEIGHT + row * (tile + PAD)
        _label(draw, subject, (PAD, top, PAD + LABEL_WIDTH, top + tile), font)
        for column, style in enumerate(styles):
            sheet.paste(_tile(cells.get((subject, style)), tile), (PAD + LABEL_WIDTH + PAD + column * (tile + PAD),
                                                                   top))
    return sheet
