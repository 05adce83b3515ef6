"""The shipped example adapters answer a running server the way their reports say.

A real `adaptserve serve` on the default base installs adapters/examples/* at start; then
`adaptserve eval --server` measures each on its held-out file, in the request shape its
manifest records, and must give the report's headline figure within 0.02.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_replicas import launch_replica, wait_ready
from trainer.eval_server import evaluate_server

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.02
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from adapters.bases import SMOLLM2
    from server.config import Settings

    workdir = tmp_path_factory.mktemp("examples-served")
    # The default base from the usual conversion cache (the later flags win); the example
    # adapters installed into an empty store at start, as on a first `adaptserve serve`.
    cache = Settings.model_fields["cache_dir"].default_factory()
    replica = launch_replica(Path(SMOLLM2), workdir / "store", workdir, "examples", extra_args=(
        "--install-example-adapters", "--cache-dir", str(cache), "--threads", "2"))
    try:
        yield wait_ready(replica, timeout=300).url
    finally:
        replica.process.kill()
        replica.process.wait()


@pytest.mark.parametrize("name, field", [("date-iso", "messages"), ("ticket-routing", "inputs")])
def test_example_reports_name_their_request_and_the_server_confirms_their_figures(server, name, field):
    report = json.loads((REPO / "adapters" / "examples" / name / "report.json").read_text())
    request = report["request"]
    assert request["field"] == field and field in request["native"]["body"]
    results = evaluate_server(str(REPO / request["held_out_file"]), server, name,
                              max_new_tokens=report["training_config"]["max_new_tokens"], progress=False)
    assert results["served"]["version"] == report["adapter"]["version"]
    headline = report["headline_metric"]
    assert abs(results["adapter"][headline] - report["metrics"][headline]) <= TOLERANCE, results["adapter"]
    assert results["adapter"].get("warned_responses", 0) == 0
