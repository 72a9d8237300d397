"""schemathesis against the running gateway's own OpenAPI schema, small (bench/fuzz.py runs it at full size): every
operation, valid and invalid bodies, query strings, headers and path ids, mixed with the tenant's real ids and a
real JPEG. No answer is a 5xx, every 4xx is in the error format of API.md, and every answer's status, content
type, headers and body are the ones the schema declares. See tests/fuzzing.py."""

import time

import pytest

from tests.fuzzing import fuzz, fuzz_platform, load_schema, report

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Per operation and generation mode (positive, negative): about 900 cases in all, in about 15 s once the
# platform is up. Derandomized: the same schema gives the same cases every run.
EXAMPLES = 12


def test_every_operation_answers_as_its_schema_declares_and_never_with_a_5xx(tmp_path, capsys):
    with fuzz_platform(tmp_path) as (plat, resources):
        started = time.monotonic()
        operations = {result.ok().label for result in load_schema(plat.url).get_all_operations()}
        summaries = list(fuzz(plat.url, resources, EXAMPLES))
        elapsed = time.monotonic() - started
    table = report(summaries)
    with capsys.disabled():
        print(f"\n{table}\n({elapsed:.1f} s)")
    assert {s.label for s in summaries} == operations
    assert sum(s.cases for s in summaries) >= 300
    assert [s.label for s in summaries if s.failed] == [], table
    # The real ids took the cases past the first 404: each kind of object was found and answered.
    statuses = {s.label: s.statuses for s in summaries}
    for label in ("GET /v1/images/{image_id}", "GET /v1/jobs/{job_id}", "GET /v1/datasets/{dataset_id}",
                  "GET /v1/collections/{collection}/subjects", "GET /v1/models/{name}"):
        assert statuses[label][200] > 0, (label, statuses[label])
    assert any(statuses[label][202] for label in ("POST /v1/classify", "POST /v1/faces/detect")), statuses
