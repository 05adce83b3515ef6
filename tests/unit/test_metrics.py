"""Metrics: bounded adapter labels, vLLM-named gauges under load, and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import openai
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import AdapterLabels, Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "adaptserve.json"


def scrape(url: str) -> dict[str, list]:
    """Sample name -> samples, from a text exposition that must parse."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


# --- bounded adapter label --------------------------------------------------------------


def test_adapters_beyond_the_limit_fold_into_other():
    labels = AdapterLabels(limit=2)
    assert [labels.label(n, count=True) for n in ("a", "b", "c", "__base__", "other")] == [
        "a", "b", "other", "__base__", "other"]


def test_rebalance_gives_the_labels_to_the_busiest_adapters():
    labels = AdapterLabels(limit=2)
    for name in ["a"] + ["b"] * 3 + ["c"] * 5:
        labels.label(name, count=True)
    assert labels.rebalance() == {"a"}
    assert labels.label("c") == "c" and labels.label("a") == "other"


def test_the_ranking_stays_bounded_whatever_names_arrive():
    labels = AdapterLabels(limit=3)
    for i in range(1000):
        labels.label(f"scan-{i}", count=True)
    for _ in range(50):
        labels.label("hot", count=True)
    assert len(labels.counts) <= 12
    labels.rebalance()
    assert "hot" in labels.labelled and len(labels.labelled) <= 3


def test_a_demoted_adapters_series_leave_the_exposition():
    metrics = Metrics()
    metrics.adapter_labels.limit = 1
    for name, calls in (("quiet", 1), ("busy", 3)):
        for _ in range(calls):
            metrics.requests.labels("/v1/chat/completions", name, "200").inc()
            metrics.generated_tokens.labels(adapter=name).inc(5)
    text = generate_latest(metrics.registry).decode()
    assert 'adapter="quiet"' in text and 'adapter="other"' in text and 'adapter="busy"' not in text
    metrics.rebalance_adapter_labels()
    metrics.requests.labels("/v1/chat/completions", "busy", "200").inc()
    text = generate_latest(metrics.registry).decode()
    assert 'adapter="quiet"' not in text and 'adapter="busy"' in text


# --- against a running server -----------------------------------------------------------


def test_counters_count_requests_and_tokens_per_adapter(llama_server):
    client = openai.OpenAI(base_url=llama_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    before = scrape(llama_server.url)
    usage = client.completions.create(model="gen-a", prompt="one two", max_tokens=4, temperature=0).usage
    requests = dict(name="adaptserve_requests_total", endpoint="/v1/completions", adapter="gen-a", status="200")
    deadline = time.monotonic() + 5  # the request is counted after its last byte is sent
    while value(after := scrape(llama_server.url), **requests) == value(before, **requests):
        assert time.monotonic() < deadline
    assert value(after, **requests) - value(before, **requests) == 1
    for name, tokens in (("adaptserve_generated_tokens_total", usage.completion_tokens),
                         ("adaptserve_prompt_tokens_total", usage.prompt_tokens)):
        assert value(after, name, adapter="gen-a") - value(before, name, adapter="gen-a") == tokens
    assert value(after, "vllm:lora_adapter_loaded", adapter_name="gen-a", level="gpu") == 1


def test_vllm_gauges_move_under_load_and_settle_when_clients_leave(llama_server):
    client = openai.OpenAI(base_url=llama_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    leave = threading.Event()

    def one() -> None:
        stream = client.chat.completions.create(
            model="gen-a", messages=[{"role": "user", "content": "one two"}], max_tokens=48, temperature=1.0,
            stream=True,
        )
        for _ in stream:
            if leave.is_set():
                stream.close()  # a client that goes away: its row must leave the batch
                return

    batch = llama_server.services.settings.max_batch_size
    threads = [threading.Thread(target=one) for _ in range(batch + 2)]  # more than a batch: some must wait
    for thread in threads:
        thread.start()
    peak = {"running": 0.0, "waiting": 0.0, "info": ""}
    deadline = time.monotonic() + 30
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline and not (
            peak["running"] and peak["waiting"] and "gen-a" in peak["info"]):
        samples = scrape(llama_server.url)
        peak["running"] = max(peak["running"], value(samples, "vllm:num_requests_running"))
        peak["waiting"] = max(peak["waiting"], value(samples, "vllm:num_requests_waiting"))
        for sample in samples.get("vllm:lora_requests_info", []):
            assert abs(sample.value - time.time()) < 60  # the value is the update's unix time
            peak["info"] += sample.labels["running_lora_adapters"] + sample.labels["waiting_lora_adapters"]
    leave.set()
    for thread in threads:
        thread.join(timeout=30)
    assert peak["running"] > 0 and peak["waiting"] > 0
    assert "gen-a" in peak["info"]
    deadline = time.monotonic() + 10
    while value(samples := scrape(llama_server.url), "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "rows of departed clients are still running"
        time.sleep(0.05)
    assert value(samples, "vllm:num_requests_waiting") == 0


def test_every_metric_the_dashboard_queries_is_exported(llama_server):
    with llama_server.client() as client:  # traffic, so labelled families have samples too
        client.post("/v1/completions", json={"model": "gen-b", "prompt": "hi", "max_tokens": 2})
        client.post("/v1/chat/completions", json={"model": "missing", "messages": [{"role": "user", "content": "x"}]})
    exported: set[str] = set()
    for family in text_string_to_metric_families(httpx.get(llama_server.url + "/metrics").text):
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
        exported.add(family.name)
        exported.update(family.name + s for s in suffixes.get(family.type, ()))
    referenced = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
    assert {"vllm:num_requests_waiting", "vllm:lora_requests_info", "adaptserve_requests_total"} <= referenced
    assert referenced - exported == set()


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "inf", "nan"}


def dashboard_metric_names(dashboard: dict) -> set[str]:
    """Metric names in every PromQL expression of the dashboard (panels and template variables)."""
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query.get("query", ""))
    names: set[str] = set()
    for query in queries:
        query = re.sub(r"label_values\(([^,)]+)(,[^)]*)?\)", r"\1", query)  # its 2nd argument is a label
        query = re.sub(r'"(?:[^"\\]|\\.)*"', "", query)  # strings (label values, regexes)
        query = re.sub(r"\{[^}]*\}", "", query)  # label matchers
        query = re.sub(r"\[[^\]]*\]", "", query)  # ranges
        query = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", query)  # label lists
        for match in re.finditer(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(\s*\()?", query):
            if match.group(2) is None and match.group(1).lower() not in PROMQL_WORDS:
                names.add(match.group(1))
    return names
