"""The `generate_grid` job: subjects x styles, one `generate` child job per cell, then contact sheets.

Parameters (normalised by the gateway): subjects (list of str), styles (list of str), template (with
"{subject}" and "{style}"), images_per_prompt (int), seed (int), model ("name:version"), negative_prompt, steps,
guidance_scale, width, height, scheduler (as a `generate` job takes them; None for the model's defaults).

Children: one `generate` per (subject, style), subjects outer and styles inner, with the prompt filled in from
the template (placeholders replaced once, in one pass: a subject containing "{style}" stays as written) and a
seed of its own, derived from the grid's seed and the cell's texts (sha256), so a cell renders the same images
whatever else is in the grid and wherever it sits in it.

Output (`gather`):
    {"cells": [{"subject", "style", "prompt", "seed", "job_id", "status", "images": [{"image_id", "seed"}, ...],
                "error": the child's error or None}, ...],   # in the children's order
     "cells_succeeded": n, "cells_failed": m,
     "cards_png": [{"kind": "style", "style": s, "png": b"..."}, ..., {"kind": "index", "png": b"..."}]}
`cards_png` is what the finalizer stores (and drops from the output). Each card's PNG records
{"card": "style" | "index", "style" (style cards), "subjects", "styles", "template", "seed", "model"}. A grid of
which no cell succeeded fails with ValueError("[all_cells_failed] ...").

Pure Python and PIL: the parent job loads no model.
"""

import hashlib
import io
import re
from collections.abc import Callable
from typing import Any

from PIL import Image, UnidentifiedImageError

from percept.predictor import ChildJob, ChildResult
from services.diffusion.cards import TILE, index_sheet, style_sheet, thumbnail
from services.diffusion.pngmeta import encode_png

CHILD_KIND = "generate"
SUCCEEDED = "succeeded"
_PLACEHOLDER = re.compile(r"\{subject\}|\{style\}")
# What a cell's child passes through from the grid unchanged.
_SHARED_PARAMS = ("negative_prompt", "model", "steps", "guidance_scale", "width", "height", "scheduler")


def fill_template(template: str, subject: str, style: str) -> str:
    """The template with "{subject}" and "{style}" replaced in one pass (no str.format: braces are text)."""
    return _PLACEHOLDER.sub(lambda match: subject if match.group() == "{subject}" else style, template)


def cell_seed(seed: int, subject: str, style: str) -> int:
    """A cell's seed (0 <= seed < 2**32): a function of the grid's seed and the cell's own texts only."""
    digest = hashlib.sha256(f"{seed}\x00{subject}\x00{style}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class GridFanOut:
    """Fans a grid out into its cells and gathers them into the grid's output and contact sheets."""

    def children(self, params: dict[str, Any]) -> list[ChildJob]:
        template = params["template"]
        children = []
        for i, subject in enumerate(params["subjects"]):
            for j, style in enumerate(params["styles"]):
                child = {
                    "prompt": fill_template(template, subject, style),
                    "seed": cell_seed(params["seed"], subject, style),
                    "num_images": params.get("images_per_prompt") or 1,
                    **{name: params.get(name) for name in _SHARED_PARAMS},
                    "subject": subject, "style": style, "cell": [i, j],
                }
                children.append(ChildJob(CHILD_KIND, child))
        return children

    def gather(self, params: dict[str, Any], children: list[ChildResult],
               read_image: Callable[[str], bytes]) -> dict[str, Any]:
        subjects, styles = list(params["subjects"]), list(params["styles"])
        per_prompt = params.get("images_per_prompt") or 1

        # 1. The cells, in the children's order
        cells = []
        tiles: dict[tuple[str, str], list[Image.Image | None]] = {}
        for child in children:
            succeeded = child.status == SUCCEEDED and child.output is not None
            images = [{"image_id": image["image_id"], "seed": image["seed"]}
                      for image in ((child.output or {}).get("images") or [])] if succeeded else []
            subject, style = child.params["subject"], child.params["style"]
            cells.append({"subject": subject, "style": style, "prompt": child.params.get("prompt"),
                          "seed": child.params.get("seed"), "job_id": child.id, "status": child.status,
                          "images": images, "error": child.error or None})
            # Thumbnails straight away: a big grid's full-size images would not all fit in memory
            tiles[(subject, style)] = [_tile(read_image(image["image_id"])) for image in images] if succeeded \
                else [None] * per_prompt
        succeeded_count = sum(cell["status"] == SUCCEEDED for cell in cells)
        if not succeeded_count:
            first_error = next((cell["error"] for cell in cells if cell["error"]), None)
            why = f" (the first error: {_error_text(first_error)})" if first_error else ""
            raise ValueError(f"[all_cells_failed] None of the grid's {len(cells)} cells rendered{why}: check the "
                             "model and the generation parameters with a single generation, then submit the grid "
                             "again.")

        # 2. The contact sheets: one per style, and the index
        base = {"subjects": subjects, "styles": styles, "template": params["template"], "seed": params["seed"],
                "model": params.get("model")}
        cards = []
        for style in styles:
            rows = [(subject, tiles.get((subject, style), [None] * per_prompt)) for subject in subjects]
            cards.append({"kind": "style", "style": style,
                          "png": encode_png(style_sheet(style, rows), {"card": "style", "style": style, **base})})
        firsts = {key: (images[0] if images else None) for key, images in tiles.items()}
        cards.append({"kind": "index",
                      "png": encode_png(index_sheet(subjects, styles, firsts), {"card": "index", **base})})
        return {"cells": cells, "cells_succeeded": succeeded_count, "cells_failed": len(cells) - succeeded_count,
                "cards_png": cards}


def _tile(data: bytes) -> Image.Image | None:
    """An image's tile for the sheets; an image that does not decode is shown as failed."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return thumbnail(image, TILE)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _error_text(error: dict[str, Any]) -> str:
    return str(error.get("message") or error.get("code") or error)
