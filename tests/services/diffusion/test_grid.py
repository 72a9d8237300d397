"""The grid fan-out (services/diffusion/grid.py): its cells' child jobs, and gathering their results into the
grid's output and contact sheets; last, a whole grid rendered by the tiny pipeline."""

import hashlib
import io
import subprocess
import sys

import pytest
from PIL import Image

from percept.predictor import ChildResult, PredictRequest
from services.diffusion.cards import FAILED_TILE, LABEL_WIDTH, PAD, TILE
from services.diffusion.grid import GridFanOut, cell_seed, fill_template
from services.diffusion.pngmeta import encode_png, read_png_record
from tests.services.diffusion.conftest import ROOT

GRID = {"subjects": ["a cat", "a lighthouse"], "styles": ["oil painting", "ink wash", "pixel art"],
        "template": "{subject}, {style}, highly detailed", "images_per_prompt": 2, "seed": 42, "model": "tiny:1",
        "negative_prompt": "blurry", "steps": 3, "guidance_scale": 6.0, "width": None, "height": None,
        "scheduler": "Euler a"}
RED, GREEN, BLUE = (220, 30, 30), (30, 200, 60), (40, 60, 230)


def png_of(colour) -> bytes:
    return encode_png(Image.new("RGB", (64, 64), colour), {"prompt": "x"})


def succeeded(child, images: list[tuple[str, int]]) -> ChildResult:
    return ChildResult(id=f"job-{child.params['cell']}", status="succeeded", params=child.params,
                       output={"images": [{"image_id": image_id, "seed": seed, "width": 64, "height": 64}
                                          for image_id, seed in images]}, error=None)


def failed(child, status: str = "failed") -> ChildResult:
    return ChildResult(id=f"job-{child.params['cell']}", status=status, params=child.params, output=None,
                       error={"code": "invalid_parameters", "message": "the prompt is too long"})


# -- children -----------------------------------------------------------------------------------------------


def test_one_generate_child_per_cell_subjects_outer_styles_inner():
    children = GridFanOut().children(GRID)

    assert [child.kind for child in children] == ["generate"] * 6
    assert [(child.params["subject"], child.params["style"], child.params["cell"]) for child in children] == [
        ("a cat", "oil painting", [0, 0]), ("a cat", "ink wash", [0, 1]), ("a cat", "pixel art", [0, 2]),
        ("a lighthouse", "oil painting", [1, 0]), ("a lighthouse", "ink wash", [1, 1]),
        ("a lighthouse", "pixel art", [1, 2])]
    first = children[0].params
    assert first == {"prompt": "a cat, oil painting, highly detailed", "seed": cell_seed(42, "a cat", "oil painting"),
                     "num_images": 2, "negative_prompt": "blurry", "model": "tiny:1", "steps": 3,
                     "guidance_scale": 6.0, "width": None, "height": None, "scheduler": "Euler a",
                     "subject": "a cat", "style": "oil painting", "cell": [0, 0]}


def test_the_template_is_filled_once_with_braces_left_as_text():
    assert fill_template("{subject} {{literal}} {0} {style} {subject}", "a {style} cat", "ink") == \
        "a {style} cat {{literal}} {0} ink a {style} cat"


def test_cell_seeds_depend_on_the_grid_seed_and_the_cells_texts_only():
    seeds = [child.params["seed"] for child in GridFanOut().children(GRID)]
    bigger = GridFanOut().children({**GRID, "subjects": ["a dog", *GRID["subjects"]]})

    assert len(set(seeds)) == 6 and all(0 <= seed < 2**32 for seed in seeds)
    assert seeds == [child.params["seed"] for child in GridFanOut().children(GRID)]
    # the same cell in another grid (another place in it) renders the same images
    assert [child.params["seed"] for child in bigger[3:]] == seeds
    assert cell_seed(43, "a cat", "oil painting") != cell_seed(42, "a cat", "oil painting")
    assert cell_seed(42, "a cat", "oil painting") == int.from_bytes(
        hashlib.sha256(b"42\x00a cat\x00oil painting").digest()[:4], "big")


def test_the_grid_module_imports_no_torch():
    probe = "import sys, services.diffusion.grid; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"

    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT).returncode == 0


# -- gather -------------------------------------------------------------------------------------------------


def test_gather_lists_every_cell_and_draws_a_sheet_per_style_and_the_index():
    fan_out = GridFanOut()
    children = fan_out.children(GRID)
    stored = {"r": png_of(RED), "g": png_of(GREEN), "b": png_of(BLUE)}
    results = [succeeded(children[0], [("r", 1), ("g", 2)]), failed(children[1]),
               succeeded(children[2], [("b", 3), ("r", 4)]), succeeded(children[3], [("g", 5), ("g", 6)]),
               failed(children[4], "canceled"), succeeded(children[5], [("b", 7), ("b", 8)])]
    reads = []

    output = fan_out.gather(GRID, results, lambda image_id: reads.append(image_id) or stored[image_id])

    assert (output["cells_succeeded"], output["cells_failed"]) == (4, 2)
    assert output["cells"][0] == {"subject": "a cat", "style": "oil painting",
                                  "prompt": "a cat, oil painting, highly detailed", "seed": children[0].params["seed"],
                                  "job_id": "job-[0, 0]", "status": "succeeded",
                                  "images": [{"image_id": "r", "seed": 1}, {"image_id": "g", "seed": 2}],
                                  "error": None}
    assert output["cells"][1]["status"] == "failed" and output["cells"][1]["images"] == []
    assert output["cells"][1]["error"] == {"code": "invalid_parameters", "message": "the prompt is too long"}
    assert output["cells"][4]["status"] == "canceled"
    assert len(reads) == 8  # each image read once

    cards = output["cards_png"]
    assert [(card["kind"], card.get("style")) for card in cards] == [
        ("style", "oil painting"), ("style", "ink wash"), ("style", "pixel art"), ("index", None)]
    assert read_png_record(cards[1]["png"]) == {
        "card": "style", "style": "ink wash", "subjects": GRID["subjects"], "styles": GRID["styles"],
        "template": GRID["template"], "seed": 42, "model": "tiny:1"}
    assert read_png_record(cards[3]["png"])["card"] == "index"

    # the index: each cell's first image, failed cells grey
    index = Image.open(io.BytesIO(cards[3]["png"])).convert("RGB")
    top = index.height - 2 * (TILE + PAD) - PAD
    def cell(row: int, column: int, dx: int = TILE // 2, dy: int = TILE // 2):
        return index.getpixel((PAD + LABEL_WIDTH + PAD + column * (TILE + PAD) + dx, top + row * (TILE + PAD) + dy))

    assert [cell(0, 0), cell(0, 2), cell(1, 0), cell(1, 2)] == [RED, BLUE, GREEN, BLUE]
    assert cell(0, 1, 3, 3) == cell(1, 1, 3, 3) == FAILED_TILE
    # a style's sheet: every image of each subject; a failed cell, a failed tile for each image it would have had
    def sheet_tiles(png: bytes, dx: int = TILE // 2) -> list[list[tuple[int, int, int]]]:
        sheet = Image.open(io.BytesIO(png)).convert("RGB")
        first_row = sheet.height - 2 * (TILE + PAD) - PAD
        return [[sheet.getpixel((PAD + LABEL_WIDTH + PAD + column * (TILE + PAD) + dx,
                                 first_row + row * (TILE + PAD) + dx)) for column in range(2)] for row in range(2)]

    assert sheet_tiles(cards[0]["png"]) == [[RED, GREEN], [GREEN, GREEN]]
    assert sheet_tiles(cards[1]["png"], dx=3) == [[FAILED_TILE, FAILED_TILE], [FAILED_TILE, FAILED_TILE]]
    assert sheet_tiles(cards[2]["png"]) == [[BLUE, RED], [BLUE, BLUE]]


def test_an_image_that_does_not_decode_is_drawn_as_failed_not_fatal():
    fan_out = GridFanOut()
    grid = {**GRID, "subjects": ["a cat"], "styles": ["oil"], "images_per_prompt": 1}
    [child] = fan_out.children(grid)

    output = fan_out.gather(grid, [succeeded(child, [("x", 1)])], lambda image_id: b"not a png")

    assert output["cells_succeeded"] == 1 and len(output["cards_png"]) == 2


def test_a_grid_of_which_no_cell_succeeded_fails():
    fan_out = GridFanOut()
    children = fan_out.children(GRID)

    with pytest.raises(ValueError) as refused:
        fan_out.gather(GRID, [failed(child) for child in children], lambda image_id: b"")

    assert str(refused.value).startswith("[all_cells_failed] None of the grid's 6 cells rendered")
    assert "the prompt is too long" in str(refused.value)


def test_a_whole_grid_rendered_by_the_tiny_pipeline(predictor):
    grid = {**GRID, "subjects": ["a cat", "a dog"], "styles": ["oil", "ink"], "images_per_prompt": 1, "steps": 2}
    fan_out = GridFanOut()
    stored: dict[str, bytes] = {}
    results = []
    for child in fan_out.children(grid):
        [output] = predictor.predict([PredictRequest([], child.params)])
        for image in output["images"]:  # what the finalizer does: store the PNG, keep its id
            image["image_id"] = image["sha256"]
            stored[image["image_id"]] = image.pop("png")
        results.append(ChildResult(id=str(child.params["cell"]), status="succeeded", params=child.params,
                                   output=output, error=None))

    gathered = fan_out.gather(grid, results, stored.__getitem__)

    assert gathered["cells_succeeded"] == 4 and len(gathered["cards_png"]) == 3
    for cell, child in zip(gathered["cells"], results, strict=True):
        [image] = cell["images"]
        assert image["seed"] == cell["seed"] == child.params["seed"]
        record = read_png_record(stored[image["image_id"]])
        assert (record["subject"], record["style"], record["prompt"]) == \
            (cell["subject"], cell["style"], cell["prompt"])
