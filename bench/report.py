"""`make bench`: one table of Percept's figures on this machine, the classifier side by side with the direct
predictor and the serving frameworks a user would pick instead (bench/serving.py, bench/peers/), result reuse (a
repeated classify answered from the first job), then face
identify at 10k / 100k / 1M (bench/faces.py), captioning and text-to-image throughput and overhead
(bench/captioner.py, bench/diffusion.py), classifier training time per 1,000 images, each worker's cold start
and RSS and the gateway's (bench/coldstart.py), and what one hand-off to a process that slept costs on this machine
(bench/handoff.py: the floor under the c=1 time outside the model).

Run: make bench   (or .venv/bin/python bench/report.py [--runs 2] [--seconds 10] [--face-sizes 10000,100000]
     [--parts serving,reuse,faces,captioning,diffusion,coldstart,handoff] [--update-readme]
     [--device auto|cpu|cuda|cuda:N])

The parts' own progress goes to stderr; stdout is the table. The table is also written to
.data/bench/last-run.md, and with --update-readme into README.md between the bench-table markers.
"""

import argparse
import contextlib
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import captioner
import coldstart
import diffusion
import faces
import handoff
import serving
from harness import ROOT, add_device_argument, apply_device

from percept.db import faces as face_search

PARTS = ("serving", "reuse", "faces", "captioning", "diffusion", "coldstart", "handoff")
HEADER = ["system / measurement", "c=1 p50", "c=1 p99", "c=1 outside the model", "c=16 throughput",
          "c=16 / direct batch 16", "also"]
README_START, README_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
Row = list[str]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def quiet() -> contextlib.AbstractContextManager:
    """The parts print their own detailed figures: to stderr, so stdout stays the one table."""
    return contextlib.redirect_stdout(sys.stderr)


def row(what: str, p50: str = "-", p99: str = "-", outside: str = "-", rate: str = "-", share: str = "-",
        also: str = "") -> Row:
    return [what, p50, p99, outside, rate, share, also]


def serving_rows(args: argparse.Namespace) -> list[Row]:
    results = serving.run_comparison(args, log)
    rows = []
    for name, cells in zip(results, serving.comparison_rows(results), strict=True):
        label, p50, p99, outside, rate, share = cells
        also = ""
        if name.startswith("percept"):
            parts = ("gateway RSS " + serving.min_median([f.gateway_rss_mb for f in results[name]], 0) + " MB",
                     serving.stages_summary(results[name]), serving.cpu_summary(results[name]))
            also = "; ".join(part for part in parts if part)
        rows.append(row(label, p50, p99, outside, rate + " images/s", share, also))
    return rows


def reuse_rows(args: argparse.Namespace) -> list[Row]:
    figures = serving.measure_reuse(args.reuse_repeats)
    log(f"  reuse: {figures.reused} of {figures.repeats} repeats reused, p50 {figures.repeat_p50_ms:.1f} ms")
    return [row("result reuse: a classify of an image classified before (POST /v1/classify, `Prefer: wait=30`)",
                f"{figures.repeat_p50_ms:.1f} ms", f"{figures.repeat_p99_ms:.1f} ms",
                also=f"{figures.reused} of {figures.repeats} answered from the first job, no model run "
                     f"(percept_jobs_reused_total{{kind=\"classify\"}} {figures.counted:.0f}); the first "
                     f"classification of each: p50 {figures.first_p50_ms:.1f} ms")]


def face_rows(args: argparse.Namespace) -> list[Row]:
    ef = face_search.HNSW_EF_SEARCH  # the platform's own setting
    face_args = faces.build_parser().parse_args(
        ["--sizes", args.face_sizes, "--queries", str(args.face_queries), "--ef", str(ef),
         *(["--device", args.device] if args.device else [])])
    with quiet():
        run = faces.measure(face_args)
    rows = []
    for size_row in run.rows:
        p50, p99, recall, _ = size_row.hnsw[ef]
        rows.append(row(f"face identify, {size_row.size:,} faces (HNSW, ef_search={ef})", f"{p50:.1f} ms",
                        f"{p99:.1f} ms", also=f"recall@1 {recall:.3f}; exact search p50 {size_row.exact_p50:.0f} ms, "
                                              f"p99 {size_row.exact_p99:.0f} ms"))
    return rows


def captioning_rows(args: argparse.Namespace) -> list[Row]:
    caption_args = captioner.build_parser().parse_args(
        ["--images", str(args.caption_images), "--epochs", str(args.caption_epochs),
         "--api-seconds", str(args.seconds)])
    with quiet():
        figures = captioner.measure(caption_args)
    rows = []
    for kind, label in (("greedy", "greedy"), ("beam", "beam-3")):
        api_1, api_16 = figures.get(f"api_{kind}_1"), figures.get(f"api_{kind}_16")
        direct_1, direct_16 = figures[f"direct_{kind}_1"], figures[f"direct_{kind}_16"]
        rows.append(row(
            f"captioning, {label}: API (LSTM captioner trained there)",
            f"{1000 / api_1:.0f} ms" if api_1 else "-",
            outside=f"{1000 / api_1 - 1000 / direct_1:.0f} ms over direct batch 1" if api_1 else "-",
            rate=f"{api_16:.1f} captions/s" if api_16 else "-",
            share=f"{100 * api_16 / direct_16:.0f}%" if api_16 else "-",
            also=f"direct: batch 1 {direct_1:.1f}/s, batch 16 {direct_16:.1f}/s"))
    rows.append(row("captioner training (direct, synthetic scenes)",
                    also=f"decoder {figures['decoder_epoch_per_1000_s']:.1f} s per epoch per 1,000 images; "
                         f"feature pass {figures['feature_pass_per_1000_s']:.1f} s per 1,000 images"))
    return rows


def diffusion_rows(args: argparse.Namespace) -> list[Row]:
    diffusion_args = diffusion.build_parser().parse_args(
        ["--images", str(args.diffusion_images), "--steps", str(args.diffusion_steps), "--grid", args.diffusion_grid])
    with quiet():
        figures = diffusion.measure(diffusion_args)
    direct, api = figures["direct_s_per_image"], figures["api_s_per_image"]
    cells = grid_cells(args.diffusion_grid)
    return [row(f"text-to-image: API (tiny SD pipeline, 64x64, {args.diffusion_steps} steps)",
                f"{api * 1000:.0f} ms", outside=f"{figures['overhead_ms']:.0f} ms over the predictor",
                rate=f"{60 * cells / figures['grid_1_workers_s']:.0f} images/min (grid, 1 worker)",
                also=f"direct predictor {direct * 1000:.0f} ms/image; {args.diffusion_grid} grid with 2 workers "
                     f"{60 * cells / figures['grid_2_workers_s']:.0f} images/min")]


def grid_cells(grid: str) -> int:
    subjects, _, styles = grid.partition("x")
    return int(subjects) * int(styles)


def coldstart_rows(args: argparse.Namespace) -> list[Row]:
    with quiet():
        figures = coldstart.measure(coldstart.POOLS, args.train_images, log)
    rows = [row(f"worker {cold.pool}: cold start (process start to first result)",
                also=f"{cold.seconds:.1f} s ({cold.first_job}); RSS {cold.rss_mb:.0f} MB")
            for cold in figures["cold_starts"]]
    if "training_s_per_1000" in figures:
        job = figures["training_job"]
        rows.append(row("classifier training through the API (POST /v1/train/classifier, default params)",
                        also=f"{figures['training_s_per_1000']:.0f} s per 1,000 images ({args.train_images} "
                             f"synthetic 96 px images, 3 classes, epochs {job['params'].get('epochs')}); "
                             f"classifier-train RSS after {figures['worker_rss_after_training_mb']:.0f} MB"))
    rows.append(row("gateway, idle after the cold starts", also=f"RSS {figures['gateway_rss_mb']:.0f} MB"))
    return rows


def handoff_rows(args: argparse.Namespace) -> list[Row]:
    figures = handoff.measure(200)
    return [row("one hand-off to another process (round trip, median of 200)", also=handoff.summary(figures))]


def machine_line(args: argparse.Namespace, minutes: float, load_at_start: float) -> str:
    import torch

    # The load average says whether something else shared the cores (the figures are then provisional).
    return (f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} cores "
            f"(load average {load_at_start:.1f} at the start), "
            f"torch {torch.__version__}, device {os.environ.get('PERCEPT_DEVICE') or 'auto'}; "
            f"{args.runs} serving runs (order reversed every other run), {args.seconds:g} s per c=16 figure; "
            f"'x / y' = min / median over the runs; this run took {minutes:.0f} min.")


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {README_START} ... {README_END} block to replace")
    readme.write_text(pattern.sub(lambda _: f"{README_START}\n{table}\n{README_END}", text, count=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    serving.add_arguments(parser)
    parser.add_argument("--parts", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        default=list(PARTS), help=f"comma separated, of {', '.join(PARTS)}")
    parser.add_argument("--face-sizes", default="10000,100000,1000000",
                        help="enrolled faces per face-identify row (1M takes ~15 minutes, mostly its index build)")
    parser.add_argument("--face-queries", type=int, default=100)
    parser.add_argument("--reuse-repeats", type=int, default=3, help="times each JPEG is sent again (result reuse)")
    parser.add_argument("--caption-images", type=int, default=200)
    parser.add_argument("--caption-epochs", type=int, default=3)
    parser.add_argument("--diffusion-images", type=int, default=4)
    parser.add_argument("--diffusion-steps", type=int, default=4)
    parser.add_argument("--diffusion-grid", default="2x2")
    parser.add_argument("--train-images", type=int, default=300, help="classifier training images (0: skip)")
    parser.add_argument("--update-readme", action="store_true", help="replace README.md's benchmark table")
    args = parser.parse_args()
    apply_device(parser, args.device)
    unknown = (set(args.parts) - set(PARTS)) | (set(args.systems) - set(serving.SYSTEMS))
    if unknown:
        parser.error(f"unknown parts or systems: {sorted(unknown)}")

    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    parts: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
        "serving": serving_rows, "reuse": reuse_rows, "faces": face_rows, "captioning": captioning_rows,
        "diffusion": diffusion_rows, "coldstart": coldstart_rows, "handoff": handoff_rows}
    rows: list[Row] = []
    for name in args.parts:
        log(f"part: {name}")
        rows += parts[name](args)
    table = serving.markdown_table(HEADER, rows)
    report = f"{table}\n\n{machine_line(args, (time.perf_counter() - started) / 60, load_at_start)}"
    print(report)
    out = ROOT / ".data" / "bench" / "last-run.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    log(f"written to {out}")
    if args.update_readme:
        update_readme(report)
        log("README.md's benchmark table replaced")


if __name__ == "__main__":
    main()
