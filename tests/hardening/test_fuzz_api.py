"""API fuzzing with schemathesis against the server's own OpenAPI document, on a live
tiny-model server: no 5xx, and every response matches the schema declared for it.

Bounded (FUZZ_EXAMPLES per operation, no shrinking-heavy phases) so it stays well under two
minutes on two cores; raise ADAPTSERVE_FUZZ_EXAMPLES for a deeper local run.
"""

from __future__ import annotations

import os
import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from tests.conftest import start_server, stop_server, tiny_settings

TOKEN = "fuzz-admin-token"
FUZZ_EXAMPLES = int(os.environ.get("ADAPTSERVE_FUZZ_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def fuzzed_server(tiny_llama, llama_adapters, tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz-store")
    for name in ("gen-a", "sentiment"):
        shutil.copytree(llama_adapters[name], store / name)
    # Small generations: the fuzzer asks for the most tokens allowed as often as the fewest.
    running = start_server(tiny_settings(tiny_llama, store, tmp_path_factory.mktemp("fuzz-srv"),
                                         admin_token=TOKEN, max_new_tokens_limit=8))
    yield running
    stop_server(running)


def test_no_server_errors_and_responses_match_their_schema(fuzzed_server):
    # Operation by operation with plain hypothesis: schemathesis' own pytest plugin does not
    # load under pytest 9 (it reads Function._nodeid).
    api = schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) > 20, [o.label for o in operations]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(headers=headers, checks=[not_a_server_error, response_schema_conformance],
                                   timeout=60)

        fuzz()
