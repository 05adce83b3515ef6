"""server.routing and InferenceService.resolve_target: splits, sticky keys, fallback, persistence."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest

from adapters.store import LocalStore
from server.config import Settings
from server.contract import AdapterBinding
from server.errors import AdapterNotFound, AdapterRejected
from server.inference import InferenceService
from server.metrics import Metrics
from server.registry import parse_ref
from server.routing import Route, RouteInvalid, RouteTable, load_routes_file, sticky_point

CANARY = {"targets": [{"adapter": "stable@v1", "weight": 90}, {"adapter": "canary", "weight": 10}]}


class FakeRegistry:
    """Binds the names it holds (generate adapters); the rest are missing or fail validation."""

    def __init__(self, names=("stable", "canary", "other"), broken=("broken",)):
        self.names, self.broken = set(names), set(broken)

    async def bind(self, ref: str) -> AdapterBinding:
        name, version = parse_ref(ref)
        if name in self.broken:
            raise AdapterRejected(f"{name} failed validation")
        if name not in self.names:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        manifest = SimpleNamespace(task="generate", ref=f"{name}@{version or 'v0'}")
        return AdapterBinding(name, version or "v0", f"key-{name}", SimpleNamespace(manifest=manifest))


def service(tmp_path, routes: dict) -> InferenceService:
    table = RouteTable(LocalStore(tmp_path))
    table.put_many({task: Route.parse(task, body) for task, body in routes.items()})
    settings = Settings(adapters_dir=tmp_path, cache_dir=tmp_path)
    return InferenceService(settings, None, None, FakeRegistry(), None, Metrics(), routes=table)


def resolve_many(inference: InferenceService, task: str, keys) -> list:
    async def run():
        return [await inference.resolve_target("generate", task=task, route_key=k) for k in keys]

    return asyncio.run(run())


def test_canary_split_ratio_within_three_sigma_over_1000_routed_calls(tmp_path):
    inference = service(tmp_path, {"sentiment": CANARY})
    n, p = 1000, 0.10
    targets = resolve_many(inference, "sentiment", [None] * n)
    canary = sum(t.binding.name == "canary" for t in targets)
    sigma = math.sqrt(n * p * (1 - p))  # 9.5 calls
    assert abs(canary - n * p) <= 3 * sigma, canary
    assert {t.task for t in targets} == {"sentiment"} and not any(t.fallback for t in targets)
    assert {t.binding.version for t in targets if t.binding.name == "stable"} == {"v1"}  # pinned version
    # Metrics by task count exactly what was served.
    sample = inference.metrics.registry.get_sample_value
    assert sample("adaptserve_task_requests_total", {"task": "sentiment", "adapter": "canary", "route": "routed"}) \
        == canary
    assert sample("adaptserve_task_requests_total", {"task": "sentiment", "adapter": "stable", "route": "routed"}) \
        == n - canary


def test_sticky_keys_stay_on_one_side_and_still_split_by_weight(tmp_path):
    inference = service(tmp_path, {"sentiment": CANARY})
    keys = [f"user-{i}" for i in range(1000)]
    first = [t.binding.name for t in resolve_many(inference, "sentiment", keys)]
    again = [t.binding.name for t in resolve_many(inference, "sentiment", keys)]
    assert first == again
    # Another replica (another table, another process) maps every key the same way.
    other = service(tmp_path / "other", {"sentiment": CANARY})
    assert [t.binding.name for t in resolve_many(other, "sentiment", keys)] == first
    assert abs(first.count("canary") - 100) <= 3 * math.sqrt(1000 * 0.1 * 0.9)
    # The task is mixed into the hash: the canary side of one route is not the canary side of all.
    assert sticky_point("sentiment", "user-1") != sticky_point("sql", "user-1")


@pytest.mark.parametrize("fallback, served", [("base", None), ("other", "other")])
def test_fallback_serves_when_the_target_is_missing_or_failing(tmp_path, fallback, served):
    inference = service(tmp_path, {
        "missing": {"adapter": "ghost", "fallback": fallback},
        "failing": {"adapter": "broken", "fallback": fallback},
    })
    for task in ("missing", "failing"):
        [target] = resolve_many(inference, task, [None])
        assert target.fallback and target.task == task
        assert (target.binding.name if target.binding else None) == served
    sample = inference.metrics.registry.get_sample_value
    assert sample("adaptserve_task_requests_total",
                  {"task": "missing", "adapter": served or "__base__", "route": "fallback"}) == 1


def test_without_fallback_the_error_surfaces_and_unknown_tasks_are_404(tmp_path):
    inference = service(tmp_path, {"strict": {"adapter": "ghost"}})
    with pytest.raises(AdapterNotFound, match="ghost"):
        resolve_many(inference, "strict", [None])
    with pytest.raises(AdapterNotFound, match="no route for task 'nope'"):
        resolve_many(inference, "nope", [None])


def test_route_parsing_reports_every_problem_at_once():
    with pytest.raises(RouteInvalid) as info:
        Route.parse("Bad Task", {"targets": [{"adapter": "../x", "weight": -1}, {"adapter": "ok", "weight": "a"}],
                                 "fallback": "/etc", "extra": 1})
    problems = " | ".join(info.value.problems)
    for fragment in ("task name", "unknown route keys", "../x", "weight -1", "'a'", "fallback"):
        assert fragment in problems
    assert Route.parse("t", {"adapter": "a@v1"}).targets[0].adapter == "a@v1"
    with pytest.raises(RouteInvalid, match="sum to 0"):
        Route.parse("t", {"targets": [{"adapter": "a", "weight": 0}]})


def test_table_persists_atomically_and_converges_between_two_readers(tmp_path):
    writer, reader = RouteTable(LocalStore(tmp_path)), RouteTable(LocalStore(tmp_path))
    writer.put(Route.parse("sql", {"adapter": "sql-v1"}))
    reader.reload()
    assert reader.get("sql").targets[0].adapter == "sql-v1"
    writer.put(Route.parse("sql", {"adapter": "sql-v2", "fallback": "base"}))
    assert reader.get("sql").targets[0].adapter == "sql-v1"  # reads never touch the store
    reader.reload()
    assert reader.get("sql").targets[0].adapter == "sql-v2" and reader.get("sql").fallback == "base"
    assert reader.delete("sql")
    writer.reload()
    assert writer.get("sql") is None
    assert not [p for p in (tmp_path / ".tmp").rglob("*") if p.is_file()]  # no temp file left behind
    # A hand edit gone wrong keeps each reader's last good routes; the next write replaces it.
    reader.put(Route.parse("keep", {"adapter": "k"}))
    (tmp_path / ".routes.json").write_text("{not json")
    reader.reload()
    assert reader.get("keep") is not None
    reader.put(Route.parse("more", {"adapter": "m"}))
    writer.reload()
    assert set(writer.routes()) == {"keep", "more"}


def test_routes_file_yaml_and_json(tmp_path):
    (tmp_path / "routes.yaml").write_text(
        "sentiment:\n  targets:\n    - {adapter: s@v1, weight: 90}\n    - {adapter: s2, weight: 10}\n"
        "  fallback: base\nsql: {adapter: sql-lora}\n"
    )
    routes = load_routes_file(tmp_path / "routes.yaml")
    assert routes["sentiment"].fallback == "base" and [t.weight for t in routes["sentiment"].targets] == [90, 10]
    (tmp_path / "empty.yaml").write_text("{}\n")  # what the k8s ConfigMap ships
    assert load_routes_file(tmp_path / "empty.yaml") == {}
