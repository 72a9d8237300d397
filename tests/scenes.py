"""Synthetic captioned scenes for testing and benchmarking captioners (nothing is downloaded).

Each scene is one shape (a colour, a shape, a size and a position) on a plain background with a little
texture; its five captions describe it in different phrasings, some naming only the colour and shape,
others the size, the position or the background, as Flickr8k's five annotators describe a photo:

    A red circle on a white background .
    A big red circle in the top left .
    There is a red circle in the top left of the picture .
    ...

The first caption always uses the first phrasing; the other four are drawn from the rest. Positions,
sizes and colours are jittered, so no two images are alike. The same arguments give the same bytes.

`scenes_zip` writes a zip laid out exactly as the official Flickr8k archives unpack (images in
`Flicker8k_Dataset/` - the archive's own spelling -, `Flickr8k.token.txt` with `name.jpg#k<TAB>caption`
lines, and the three split files, one image name per line):

    zip_bytes = scenes_zip(410, seed=0, split=(300, 50, 60))
    held_out = make_scenes(40, seed=1)   # Scene(name, image, captions, colour, shape, ...)
"""

import io
import math
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGES_FOLDER = "Flicker8k_Dataset"  # sic: the official Flickr8k_Dataset.zip spells it so
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
CAPTIONS_PER_IMAGE = 5

# Far apart in hue and brightness: a frozen ImageNet encoder tells them apart from pooled features.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 35),
    "green": (40, 170, 50),
    "blue": (40, 70, 215),
    "yellow": (235, 215, 40),
    "purple": (135, 45, 185),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES: dict[str, float] = {"small": 0.13, "big": 0.27}  # radius as a fraction of the image side
# Centre of the shape as fractions of the image side (x, y); what the captions call it.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "middle": (0.5, 0.5),
}
# Phrasings; the first is in every scene's captions.
PHRASINGS = (
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} in the {position}",
    "there is a {colour} {shape} in the {position} of the picture",
    "a {size} {colour} {shape} on {background}",
    "the {shape} is {colour} and {size}",
    "a {colour} {shape} near the {position}",
    "{size} {colour} {shape} against a {background} background",
)
COLOUR_JITTER = 18  # per channel, uniform +-
POSITION_JITTER = 0.05  # of the image side
SIZE_JITTER = 0.15  # relative
NOISE_SIGMA = 6.0
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Scene:
    name: str  # "<number>_<hex>.jpg", as Flickr8k's names
    image: bytes  # JPEG
    captions: tuple[str, ...]  # as written in the token file: capitalised, " ." at the end
    colour: str
    shape: str
    size: str
    position: str
    background: str


def make_scenes(n_images: int, seed: int, size: int = 96) -> list[Scene]:
    """`n_images` scenes of `size` x `size` pixels; deterministic for (n_images, seed, size)."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    rng = np.random.default_rng([seed, 8])
    scenes = []
    for index in range(n_images):
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        size_word = str(rng.choice(list(SIZES)))
        position = str(rng.choice(list(POSITIONS)))
        background = str(rng.choice(list(BACKGROUNDS)))
        image = draw_scene(rng, colour, shape, size_word, position, background, size)
        others = rng.permutation(np.arange(1, len(PHRASINGS)))[:CAPTIONS_PER_IMAGE - 1]
        words = {"colour": colour, "shape": shape, "size": size_word, "position": position,
                 "background": background}
        captions = tuple(as_written(PHRASINGS[p].format(**words)) for p in (0, *others.tolist()))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        name = f"{1000 + seed:04d}{index:06d}_{rng.bytes(5).hex()}.jpg"
        scenes.append(Scene(name, buffer.getvalue(), captions, colour, shape, size_word, position, background))
    return scenes


def as_written(caption: str) -> str:
    """Flickr8k's style: a capital first letter and a space before the full stop."""
    return caption[0].upper() + caption[1:] + " ."


def draw_scene(rng: np.random.Generator, colour: str, shape: str, size_word: str, position: str,
               background: str, size: int) -> Image.Image:
    big = size * SUPERSAMPLE
    base = np.array(BACKGROUNDS[background], dtype=np.float32)
    # A faint blurred texture, so the background is not one flat colour.
    coarse = rng.normal(0, 10, size=(6, 6, 3)) + 128
    texture = np.asarray(Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize(
        (big, big), Image.Resampling.BICUBIC), dtype=np.float32) - 128
    image = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = SIZES[size_word] * big * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    centre = (np.array(POSITIONS[position]) + rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)) * big
    fill = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + rng.integers(
        -COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255))
    draw.polygon(shape_vertices(shape, centre, radius, rng.uniform(-0.3, 0.3)), fill=fill)
    image = image.resize((size, size), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(0.4))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, NOISE_SIGMA, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def shape_vertices(shape: str, centre: np.ndarray, radius: float, rotation: float) -> list[tuple[float, float]]:
    """A polygon: a circle is a 48-gon; the triangle points up and the square is upright (plus `rotation`,
    a small tilt, for the square and the star)."""
    if shape == "circle":
        radii, angles = [radius] * 48, [i * 2 * math.pi / 48 for i in range(48)]
    elif shape == "square":
        radii = [radius] * 4
        angles = [math.pi / 4 + i * math.pi / 2 + rotation for i in range(4)]
    elif shape == "triangle":
        radii, angles = [radius * 1.15] * 3, [-math.pi / 2 + i * 2 * math.pi / 3 for i in range(3)]
    elif shape == "star":
        radii = [radius * 1.1 if i % 2 == 0 else radius * 0.45 for i in range(10)]
        angles = [-math.pi / 2 + i * math.pi / 5 + rotation for i in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    return [(float(centre[0] + r * math.cos(a)), float(centre[1] + r * math.sin(a)))
            for r, a in zip(radii, angles, strict=True)]


def scenes_zip(n_images: int, seed: int, size: int = 96, split: tuple[int, int, int] | None = None,
               with_splits: bool = True) -> bytes:
    """A Flickr8k-layout zip of `make_scenes(n_images, seed, size)`.

    `split`: (train, dev, test) image counts, in that order of the scenes (default 75% / 12.5% / the rest);
    `with_splits=False` writes no split files (a trainer then makes its own split).
    """
    scenes = make_scenes(n_images, seed, size)
    if split is None:
        n_train, n_dev = round(n_images * 0.75), round(n_images * 0.125)
        split = (n_train, n_dev, n_images - n_train - n_dev)
    if sum(split) != n_images or min(split) < 0:
        raise ValueError(f"split {split} must be three counts adding up to n_images ({n_images})")
    bounds = np.cumsum((0, *split))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for scene in scenes:
            archive.writestr(zipfile.ZipInfo(f"{IMAGES_FOLDER}/{scene.name}", date_time=(2024, 1, 1, 0, 0, 0)),
                             scene.image)
        tokens = "".join(f"{scene.name}#{k}\t{caption}\n"
                         for scene in scenes for k, caption in enumerate(scene.captions))
        archive.writestr(zipfile.ZipInfo(TOKEN_FILE, date_time=(2024, 1, 1, 0, 0, 0)), tokens)
        if with_splits:
            for filename, start, stop in zip(SPLIT_FILES.values(), bounds[:-1], bounds[1:], strict=True):
                names = "".join(f"{scene.name}\n" for scene in scenes[start:stop])
                archive.writestr(zipfile.ZipInfo(filename, date_time=(2024, 1, 1, 0, 0, 0)), names)
    return buffer.getvalue()


def add_files(zip_bytes: bytes, files: dict[str, bytes]) -> bytes:
    """The zip with `files` (path -> bytes) added: a dataset carrying a trainer's extra inputs (word
    vectors, an encoder) beside the same photos."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as source, \
            zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info in source.infolist():
            archive.writestr(info, source.read(info))
        for path, data in files.items():
            archive.writestr(zipfile.ZipInfo(path, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()
