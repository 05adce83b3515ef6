"""A failing engine step fails the requests in it with a clear error; the server keeps serving."""

from __future__ import annotations

from server.engine.factory import build_engine
from tests.conftest import start_server, stop_server, tiny_settings


def failing_once_factory(settings):
    engine = build_engine(settings)
    original_step = engine.step
    state = {"armed": False}

    def step():
        if state["armed"]:
            state["armed"] = False
            raise RuntimeError("simulated kernel failure")
        return original_step()

    engine.step = step
    engine.arm_failure = lambda: state.update(armed=True)
    return engine


def test_failed_step_is_a_500_and_the_next_request_is_served(tiny_llama, llama_adapters, tmp_path):
    store = next(iter(llama_adapters.values())).parent
    running = start_server(tiny_settings(tiny_llama, store, tmp_path), engine_factory=failing_once_factory)
    try:
        with running.client() as client:
            running.services.engine.arm_failure()
            failed = client.post("/v1/generate", json={"prompt": "one two", "max_new_tokens": 4})
            assert failed.status_code == 500
            assert failed.json()["error"]["code"] == "generation_failed"
            served = client.post("/v1/generate", json={"prompt": "one two", "max_new_tokens": 4})
            assert served.status_code == 200 and served.json()["finish_reason"] in ("stop", "length")
        assert running.services.engine.stats()["running"] == 0
    finally:
        stop_server(running)
