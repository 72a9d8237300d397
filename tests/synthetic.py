"""Synthetic labelled photos for testing and benchmarking custom classifiers (nothing is downloaded).

Each class is a coloured shape. A class name that mentions a colour and/or a shape from the tables
below ("red-circle", "blue_square", "green triangle") gets exactly those; whatever it does not name comes
from DEFAULT_STYLES by the class's position among the sorted class names. Each default style differs from
the one before it in exactly one thing, so {"majority": ..., "minority": ...} are a red and an orange
circle: learnable from ImageNet features, but confusable enough (ImageNet features care more about shape
than hue) that a 20:1 imbalance visibly costs the minority class recall unless training balances it.

Every sample varies: shape position, size, rotation and squash, a jittered fill colour, a smooth random
background with pixel noise and a few distractor strokes. The same counts, seed and size give the same
images.

    samples = make_samples({"majority": 400, "minority": 20}, seed=1)
    write_zip(samples, "dataset.zip", corrupt=2)   # majority/0.png, ..., majority/broken_0.jpg

Real photos, for what synthetic shapes cannot show: `imbalanced_faces` draws a training set and a disjoint
held-out set from skimage's `lfw_subset` (100 real 25 x 25 face photos, 100 non-face photos), also offline.

    train, held_out = imbalanced_faces(minority="face", train=(80, 3), held_out=(20, 40), seed=0)"""

import io
import math
import re
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from skimage import data

# Hue-wheel order: neighbours are similar colours.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 40),
    "orange": (225, 115, 35),
    "yellow": (225, 205, 45),
    "green": (55, 165, 60),
    "teal": (40, 160, 160),
    "blue": (45, 85, 205),
    "purple": (130, 60, 190),
    "pink": (225, 100, 170),
}
# Polygon corners (0: a circle; negative: the special shapes in draw_shape), similar shapes together.
SHAPES: dict[str, int] = {
    "circle": 0,
    "octagon": 8,
    "hexagon": 6,
    "pentagon": 5,
    "square": 4,
    "diamond": -4,  # a rhombus, one diagonal 0.6 times the other
    "triangle": 3,
    "star": -5,  # five points
}


def default_styles() -> list[tuple[tuple[int, int, int], str]]:
    """Each style differs from the one before in exactly one thing, colour or shape, so neighbours are
    confusable: red circle, orange circle, orange octagon, yellow octagon, yellow hexagon, ..."""
    wheel, shapes = list(COLOURS.values()), list(SHAPES)
    styles = []
    for i in range(len(wheel)):
        styles.append((wheel[i], shapes[i % len(shapes)]))
        styles.append((wheel[(i + 1) % len(wheel)], shapes[i % len(shapes)]))
    return styles


DEFAULT_STYLES = default_styles()
COLOUR_JITTER = 40  # per channel, uniform +-: red and orange (70 apart in green) just overlap
SCALE_RANGE = (0.22, 0.42)  # shape radius as a fraction of the image size
STRETCH_RANGE = (0.7, 1.0)  # squashed along one axis, as if seen at an angle
SUPERSAMPLE = 2  # draw at twice the size, then downsample: anti-aliased edges
NOISE_SIGMA = 8.0  # pixel noise, in 0..255 units
DISTRACTORS = 3  # random strokes per image, up to


def class_style(name: str, index: int) -> tuple[tuple[int, int, int], str]:
    """The (colour, shape) of a class: words in its name win, the default table fills the rest."""
    colour, shape = DEFAULT_STYLES[index % len(DEFAULT_STYLES)]
    for word in re.split(r"[^a-z]+", name.casefold()):
        if word in COLOURS:
            colour = COLOURS[word]
        elif word in SHAPES:
            shape = word
    return colour, shape


def make_samples(counts: dict[str, int], seed: int = 0, size: int = 96) -> list[tuple[Image.Image, str]]:
    """`counts[label]` RGB images of `size` x `size` per class, classes in sorted order; deterministic."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    for label, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"counts must be whole numbers of images, got {count!r} for {label!r}")
    rng = np.random.default_rng(seed)
    samples: list[tuple[Image.Image, str]] = []
    for index, label in enumerate(sorted(counts)):
        colour, shape = class_style(label, index)
        samples.extend((draw_sample(rng, colour, shape, size), label) for _ in range(counts[label]))
    return samples


def draw_sample(rng: np.random.Generator, colour: tuple[int, int, int], shape: str, size: int) -> Image.Image:
    big = size * SUPERSAMPLE
    image = random_background(rng, big)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, DISTRACTORS + 1)):
        points = [tuple(p) for p in rng.uniform(0, big, size=(2, 2))]
        grey = int(rng.integers(40, 220))
        draw.line(points, fill=(grey, grey, grey), width=int(rng.integers(1, 4) * SUPERSAMPLE))

    radius = rng.uniform(*SCALE_RANGE) * big
    # Keep the shape inside the central crop the classifier's preprocessing keeps (87.5%).
    margin = radius + 0.07 * big
    centre = rng.uniform(margin, big - margin, size=2) if margin < big / 2 else np.array([big / 2, big / 2])
    jittered = np.clip(np.array(colour) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    fill = tuple(int(c) for c in jittered)
    draw_shape(draw, shape, centre, radius, rng.uniform(0, 2 * math.pi), rng.uniform(*STRETCH_RANGE), fill)

    image = image.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, NOISE_SIGMA, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def random_background(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth two-colour gradient in a random direction, blurred blotches on top."""
    a, b = rng.integers(60, 200, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)[..., None]
    pixels = a * (1 - t) + b * t
    coarse = rng.normal(0, 15, size=(8, 8, 3))
    blotches = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC), dtype=np.float32) - 128
    image = Image.fromarray(np.clip(pixels + blotches, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(radius=1))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: np.ndarray, radius: float, rotation: float,
               stretch: float, fill: tuple[int, ...]) -> None:
    """A polygon (a circle is a 48-gon) squashed by `stretch` along one axis, then rotated."""
    corners = SHAPES[shape]
    if corners == 0:
        radii, angles = [radius] * 48, [i * 2 * math.pi / 48 for i in range(48)]
    elif corners == -4:  # diamond: a square stretched along one diagonal
        radii, angles = [radius, radius * 0.6] * 2, [i * math.pi / 2 for i in range(4)]
    elif corners < 0:  # star: alternate outer and inner points
        points = -corners
        radii = [radius if i % 2 == 0 else radius * 0.45 for i in range(2 * points)]
        angles = [i * math.pi / points for i in range(2 * points)]
    else:
        radii, angles = [radius] * corners, [i * 2 * math.pi / corners for i in range(corners)]
    cos, sin = math.cos(rotation), math.sin(rotation)
    vertices = []
    for r, a in zip(radii, angles, strict=True):
        x, y = r * math.cos(a), r * math.sin(a) * stretch
        vertices.append((centre[0] + x * cos - y * sin, centre[1] + x * sin + y * cos))
    draw.polygon(vertices, fill=fill)


def write_zip(samples: list[tuple[Image.Image, str]], path_or_buffer: str | Path | BinaryIO, *,
              corrupt: int = 0) -> None:
    """One folder per class (`<class>/<n>.png`), plus `corrupt` undecodable `<class>/broken_<n>.jpg` files."""
    if corrupt < 0:
        raise ValueError(f"corrupt must not be negative, got {corrupt}")
    labels = sorted({label for _, label in samples})
    if corrupt and not labels:
        raise ValueError("corrupt files need at least one sample to name a class folder")
    numbers: dict[str, int] = {}
    with zipfile.ZipFile(path_or_buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for image, label in samples:
            n = numbers[label] = numbers.get(label, -1) + 1
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            archive.writestr(f"{label}/{n}.png", buffer.getvalue())
        for n in range(corrupt):
            # A JPEG start-of-image marker followed by garbage: looks like a photo, never decodes.
            garbage = b"\xff\xd8\xff\xe0" + np.random.default_rng(n).bytes(200)
            archive.writestr(f"{labels[n % len(labels)]}/broken_{n}.jpg", garbage)


FACE_CLASSES = ("face", "other")


def lfw_photos() -> dict[str, list[Image.Image]]:
    """skimage's lfw_subset as RGB photos: {"face": 100 faces, "other": 100 non-faces}, 25 x 25 pixels
    (the classifier's preprocessing upscales them, as it does any small photo)."""
    pixels = (data.lfw_subset() * 255).round().astype(np.uint8)
    photos = [Image.fromarray(p).convert("RGB") for p in pixels]
    return {"face": photos[:100], "other": photos[100:]}


def imbalanced_faces(minority: str, train: tuple[int, int], held_out: tuple[int, int], seed: int = 0
                     ) -> tuple[list[tuple[Image.Image, str]], list[tuple[Image.Image, str]]]:
    """(training, held-out) samples of lfw_photos, disjoint: `train` = (majority, minority) photo counts,
    `held_out` likewise; which photos go where is drawn from `seed`."""
    if minority not in FACE_CLASSES:
        raise ValueError(f"minority must be one of {FACE_CLASSES}, got {minority!r}")
    majority = next(label for label in FACE_CLASSES if label != minority)
    photos = lfw_photos()
    rng = np.random.default_rng(seed)
    training: list[tuple[Image.Image, str]] = []
    evaluation: list[tuple[Image.Image, str]] = []
    for label, n_train, n_held_out in ((majority, train[0], held_out[0]), (minority, train[1], held_out[1])):
        if n_train + n_held_out > len(photos[label]):
            raise ValueError(f"{label!r} has {len(photos[label])} photos, {n_train} + {n_held_out} asked for")
        order = rng.permutation(len(photos[label]))
        training.extend((photos[label][i], label) for i in order[:n_train])
        evaluation.extend((photos[label][i], label) for i in order[n_train:n_train + n_held_out])
    return training, evaluation
