"""API fuzzing at full size: schemathesis against a running gateway's own OpenAPI schema (GET /openapi.json), on a
platform of its own (embedded Postgres and Redis, the gateway, a classifier and a face worker) with a real API key.

Every operation gets `--examples` generated cases per generation mode (positive: valid per the schema; negative:
invalid bodies, query strings, headers and path ids), mixed with the tenant's real ids, a real JPEG or zip in place
of a generated file, wrong or missing keys, and edge values of `Prefer`, `Idempotency-Key` and `Cancel-After`.
Each answer is checked: no 5xx, every 4xx/5xx in the error format of API.md (with `Retry-After` on 429/503), and
its status code, content type, headers and body as the schema declares them.

Run: .venv/bin/python bench/fuzz.py [--examples 30] [--only SUBSTRING] [--keep DIR]

Prints, per operation, the cases run, the statuses seen and the failures, then each failure with a curl command
that reproduces it; exits 1 if any check failed. Derandomized: the same schema gives the same cases. The
implementation is tests/fuzzing.py, which `make test` runs small (tests/gateway/test_fuzz.py).
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzing import fuzz, fuzz_platform, report  # noqa: E402 - after the path it is found on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=30,
                        help="cases per operation and generation mode (default 30: about 2,300 cases in all)")
    parser.add_argument("--only", help="fuzz only the operations whose label (e.g. `POST /v1/classify`) has this")
    parser.add_argument("--keep", type=Path, help="keep the platform's data dir (and its logs) here")
    args = parser.parse_args()
    data_dir = args.keep or Path(tempfile.mkdtemp(prefix="percept-fuzz-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with fuzz_platform(data_dir) as (plat, resources):
            started = time.monotonic()
            summaries = []
            for summary in fuzz(plat.url, resources, args.examples,
                                only=(lambda label: args.only in label) if args.only else None):
                print(f"{summary.label}: {summary.cases} cases, {summary.failed} failures", file=sys.stderr)
                summaries.append(summary)
            elapsed = time.monotonic() - started
    finally:
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(report(summaries))
    print(f"\n{sum(s.cases for s in summaries)} cases in {elapsed:.1f} s")
    sys.exit(1 if any(s.failed for s in summaries) else 0)


if __name__ == "__main__":
    main()
