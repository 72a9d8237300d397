"""Classic meme captions on a photo: bold white upper-case text with a black outline, top and bottom.

The font is Pillow's own scalable default font (`ImageFont.load_default(size=...)`: Aileron Regular,
embedded in Pillow and rendered by FreeType), so nothing is installed on the system or downloaded. Aileron
has no bold weight: letters are emboldened by a white stroke drawn over a wider black one, which is also
the outline.
"""

import random
from functools import cache

from PIL import Image, ImageDraw, ImageFont, features

from services.facerec.expressions import LABELS

# At most this many lines per caption block: a longer text gets a smaller font, then an ellipsis.
MAX_LINES = 3
# Each block takes at most this share of the image height, so the face in the middle stays visible.
MAX_BLOCK_HEIGHT_FRACTION = 0.28
SIDE_MARGIN_FRACTION = 0.04
# The largest font is 1/7 of the shorter side: about the size of the classic meme generators' text.
MAX_FONT_FRACTION = 1 / 7
MIN_FONT_SIZE = 10
# Stroke widths as fractions of the font size: emboldening (white) and the outline around it (black).
BOLD_FRACTION = 0.03
OUTLINE_FRACTION = 0.07
LINE_SPACING_FRACTION = 0.05
ELLIPSIS = "..."

# Curated per expression (fer's seven labels): short, light, safe for work.
CAPTIONS: dict[str, list[tuple[str, str]]] = {
    "happy": [
        ("When the code compiles", "on the first try"),
        ("Friday afternoon", "and every test is green"),
        ("When someone says", "the meeting is cancelled"),
        ("Me after one coffee", "ready to take on the world"),
    ],
    "sad": [
        ("When you realise", "it's only Tuesday"),
        ("That feeling when", "the last slice of pizza is gone"),
        ("Me watching the final episode", "of my favourite series"),
    ],
    "angry": [
        ("Who moved", "my stapler?"),
        ("When the wifi drops", "at 99% of the download"),
        ("Reply all", "one more time. I dare you."),
    ],
    "surprise": [
        ("Wait...", "it actually worked?"),
        ("When you check", "your weekly screen time"),
        ("Me seeing the price", "of a sandwich at the airport"),
    ],
    "fear": [
        ("When the boss says", "\"got a minute?\""),
        ("Deploying on a Friday", "what could possibly go wrong"),
        ("When you hear a noise", "in the kitchen at 3 am"),
    ],
    "disgust": [
        ("When someone puts", "pineapple on it"),
        ("Me reading", "my own code from last year"),
        ("When the milk is", "one day past the date"),
    ],
    "neutral": [
        ("Another day", "another spreadsheet"),
        ("I'm not saying it's bad", "I'm just not saying anything"),
        ("When someone says", "\"this could have been an email\""),
    ],
}
assert set(CAPTIONS) == set(LABELS)


def pick_caption(expression: str, seed: int = 0) -> tuple[str, str]:
    """(top, bottom) for an expression; the same seed always gives the same caption."""
    if expression not in CAPTIONS:
        raise ValueError(f"no captions for expression {expression!r}; expected one of {', '.join(CAPTIONS)}")
    captions = CAPTIONS[expression]
    return captions[random.Random(seed).randrange(len(captions))]


def render_meme(image: Image.Image, top_text: str, bottom_text: str) -> Image.Image:
    """A copy of `image` (RGB, same size) with the top and bottom texts in classic meme style."""
    if not features.check("freetype2"):
        raise RuntimeError("Pillow was built without FreeType: the scalable default font is unavailable")
    meme = image.convert("RGB")
    draw = ImageDraw.Draw(meme)
    width, height = meme.size
    for text, at_top in ((top_text, True), (bottom_text, False)):
        text = " ".join(text.upper().split())
        if not text:
            continue
        size, lines = fit_text(text, width * (1 - 2 * SIDE_MARGIN_FRACTION), height * MAX_BLOCK_HEIGHT_FRACTION,
                               max(MIN_FONT_SIZE, round(min(width, height) * MAX_FONT_FRACTION)))
        draw_block(draw, lines, size, width, height, at_top)
    return meme


@cache
def meme_font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    assert isinstance(font, ImageFont.FreeTypeFont)  # guaranteed when FreeType is available
    return font


def stroke_widths(size: int) -> tuple[int, int]:
    """(bold, bold + outline) stroke widths in pixels for a font size."""
    bold = max(1, round(size * BOLD_FRACTION))
    return bold, bold + max(1, round(size * OUTLINE_FRACTION))


def line_height(size: int) -> int:
    ascent, descent = meme_font(size).getmetrics()
    return ascent + descent + 2 * stroke_widths(size)[1] + round(size * LINE_SPACING_FRACTION)


def text_width(text: str, size: int) -> float:
    return meme_font(size).getlength(text) + 2 * stroke_widths(size)[1]


def wrap(text: str, size: int, max_width: float) -> list[str]:
    """Greedy word wrap; a word wider than the line is split between characters."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if text_width(candidate, size) <= max_width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while len(line) > 1 and text_width(line, size) > max_width:
            low, high = 1, len(line) - 1  # the longest prefix that fits (at least one character)
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if text_width(line[:middle], size) <= max_width else (low, middle - 1)
            lines.append(line[:low])
            line = line[low:]
    if line:
        lines.append(line)
    return lines


def fit_text(text: str, max_width: float, max_height: float, max_size: int) -> tuple[int, list[str]]:
    """The largest font size whose wrapped lines fit the block; at the smallest size, an ellipsis ends it."""
    size = max_size
    while True:
        lines = wrap(text, size, max_width)
        fits = len(lines) <= MAX_LINES and len(lines) * line_height(size) <= max_height
        if fits or size <= MIN_FONT_SIZE:
            break
        size = max(MIN_FONT_SIZE, int(size * 0.9))
    if len(lines) > MAX_LINES:
        last = lines[MAX_LINES - 1]
        while last and text_width(last + ELLIPSIS, size) > max_width:
            last = last[:-1]
        lines = [*lines[: MAX_LINES - 1], last.rstrip() + ELLIPSIS]
    return size, lines


def draw_block(draw: ImageDraw.ImageDraw, lines: list[str], size: int, width: int, height: int,
               at_top: bool) -> None:
    font = meme_font(size)
    bold, outline = stroke_widths(size)
    step = line_height(size)
    margin = round(height * 0.02)
    y = margin if at_top else height - margin - step * len(lines)
    for line in lines:
        position = (width / 2, y + outline)
        # The black pass is the outline; the white pass, stroked in white, makes the regular font bold.
        draw.text(position, line, font=font, anchor="ma", fill="black", stroke_width=outline, stroke_fill="black")
        draw.text(position, line, font=font, anchor="ma", fill="white", stroke_width=bold, stroke_fill="white")
        y += step
