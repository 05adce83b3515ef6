"""The benchmark's arithmetic: percentiles, windowed summaries, the table and the JSON file."""

from __future__ import annotations

import json

import pytest

from bench.load import make_prompts
from bench.report import (
    ABANDONED,
    RequestRecord,
    Target,
    add_delta,
    engine_counters,
    format_counters,
    format_table,
    histogram_quantile,
    parse_samples,
    percentile,
    ratio,
    summarize,
    write_json,
)
from server.metrics import Metrics


def record(start: float, end: float, ttft: float | None = None, tokens: int = 64, streamed: bool = True,
           error: str | None = None, warmup: bool = False, abandoned: bool = False) -> RequestRecord:
    """A request whose tokens arrived evenly from start + ttft to end (all at end if not streamed)."""
    ttft = end - start if ttft is None else ttft
    first = start + ttft if streamed else end
    times = tuple(first + (end - first) * i / max(1, tokens - 1) for i in range(tokens)) if not error else ()
    return RequestRecord(start, end, ttft, 10, tokens, ABANDONED if abandoned else "length", streamed, error,
                         times, warmup)


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_summarize_counts_tokens_by_arrival_and_latency_over_full_requests():
    records = [
        record(0.0, 10.0, ttft=1.0, tokens=10),  # tokens at 1..10: one inside the window, at 10
        record(5.0, 15.0, ttft=1.0, tokens=10),  # tokens at 6..15: 6 inside (10..15)
        record(12.0, 19.0, ttft=1.0, tokens=7, warmup=True),  # all 7 (13..19) count; no latency
        record(14.0, 20.0, ttft=1.0, tokens=6, abandoned=True),  # 15..20: counted, no latency
        record(11.0, 12.0, error="HTTP 429: full"),
    ]
    summary = summarize(records, [(10.0, 20.0)])
    assert summary["window_s"] == 10.0
    assert summary["tokens_per_s"] == pytest.approx((1 + 6 + 7 + 6) / 10)
    assert summary["completed"] == 2  # the full-length requests that ended inside
    assert summary["errors"] == 1 and summary["error_examples"] == ["HTTP 429: full"]
    assert summary["ttft_p50_s"] == 1.0 and summary["latency_p50_s"] == 10.0
    assert summary["requests_per_s"] == pytest.approx(2.0 / 10)  # the token rate over 10-token requests
    assert summary["ttft_is_latency"] is False


def test_summarize_over_rounds_ends_each_window_at_its_last_token():
    # A serial server that answers in one piece: the work after its last answer is invisible.
    records = [record(0.0, 10.0, streamed=False), record(0.0, 20.0, streamed=False),
               record(100.0, 110.0, streamed=False)]
    summary = summarize(records, [(0.0, 25.0), (100.0, 115.0)])
    assert summary["window_s"] == 30.0  # 20 + 10
    assert summary["tokens_per_s"] == pytest.approx(3 * 64 / 30)
    assert summary["completed"] == 3


def test_summarize_flags_ttft_from_a_server_that_does_not_stream():
    summary = summarize([record(0.0, 9.0, streamed=False)], [(0.0, 10.0)])
    assert summary["ttft_is_latency"] is True
    assert summary["ttft_p50_s"] == summary["latency_p50_s"] == 9.0


def test_summarize_with_nothing_completed():
    summary = summarize([], [(0.0, 10.0)])
    assert summary["completed"] == 0 and summary["tokens_per_s"] == 0.0
    assert summary["ttft_p50_s"] is None and summary["requests_per_s"] is None


def test_ratio_and_targets():
    assert ratio(90.0, 100.0) == 0.9
    assert ratio(None, 100.0) is None and ratio(5.0, 0.0) is None
    assert Target("x", 12.0, 10.0).met is True
    assert Target("ttft", 2.0, 1.5, higher_is_better=False).met is False
    assert Target("y", None, 1.0).met is None
    assert "MISSED" in Target("ttft", 2.0, 1.5, higher_is_better=False).line()


def test_table_aligns_columns_and_marks_unstreamed_ttft():
    runs = [
        {"name": "a: naive K=8", "server": "naive", "concurrency": 32, "adapters": 8, "completed": 6,
         "tokens_per_s": 6.4, "requests_per_s": 0.1, "ttft_p50_s": 30.0, "ttft_p95_s": 50.0,
         "latency_p50_s": 30.0, "latency_p95_s": 50.0, "mean_completion_tokens": 64.0, "peak_rss_mb": 900.0,
         "ttft_is_latency": True},
        {"name": "a: K=8", "server": "adaptserve", "concurrency": 32, "adapters": 8, "completed": 120,
         "tokens_per_s": 80.25, "requests_per_s": 1.25, "ttft_p50_s": 0.8, "ttft_p95_s": None,
         "latency_p50_s": 20.0, "latency_p95_s": 25.0, "mean_completion_tokens": 64.0, "peak_rss_mb": 1100.0},
    ]
    lines = format_table(runs).splitlines()
    assert len({len(line) for line in lines[:4]}) == 1  # header, rule and rows share one width
    assert "30.00*" in lines[2] and "80.2" in lines[3] and " - " in lines[3]
    assert lines[-1].startswith("* the server streams nothing")


def test_write_json_round_trips(tmp_path):
    path = tmp_path / "results" / "run.json"
    write_json(path, {"command": "adaptserve bench --quick"}, [{"name": "b: base", "tokens_per_s": 90.0}],
               [Target("(b) adapters / base", 0.9, 0.85)])
    document = json.loads(path.read_text())
    assert document["meta"]["command"] == "adaptserve bench --quick"
    assert document["runs"][0]["tokens_per_s"] == 90.0
    assert document["targets"] == [
        {"name": "(b) adapters / base", "value": 0.9, "goal": 0.85, "higher_is_better": True, "met": True}
    ]


def test_prompts_are_distinct_and_sized():
    prompts = make_prompts(64)
    assert len(set(prompts)) == len(prompts)
    assert all(40 <= len(p.split()) <= 56 for p in prompts)


def test_ttft_is_over_requests_sent_inside_the_window_of_any_length():
    records = [
        record(0.0, 30.0, ttft=12.0),  # the cold first prefill, sent before the window
        record(11.0, 14.0, ttft=0.5, tokens=4, warmup=True),
        record(12.0, 30.0, ttft=1.5, abandoned=True),
    ]
    summary = summarize(records, [(10.0, 20.0)])
    assert summary["ttft_p50_s"] == pytest.approx(1.0)
    assert summary["ttft_p95_s"] == pytest.approx(1.45)
    assert summary["completed"] == 0 and summary["latency_p50_s"] is None


def scrape_of(metrics: Metrics) -> dict:
    from prometheus_client import generate_latest

    return parse_samples(generate_latest(metrics.registry).decode())


def test_server_counters_are_what_grew_between_two_scrapes_of_the_real_metrics():
    """The bench reads the server's own histogram of adapter loads between two scrapes: loads
    before the first scrape are not counted, and p50/p95 land where the observations are."""
    metrics = Metrics()
    metrics.adapter_load_seconds.labels("device").observe(5.0)  # before the run: not counted
    metrics.prefix_cache_queries.labels("base").inc(1000)
    before = scrape_of(metrics)
    for seconds in [0.0008] * 90 + [0.004] * 10:  # 90 loads under a millisecond, 10 of 4 ms
        metrics.adapter_load_seconds.labels("device").observe(seconds)
    metrics.adapter_load_seconds.labels("cpu").observe(0.03)
    metrics.prefix_cache_queries.labels("base").inc(400)
    metrics.prefix_cache_hits.labels("base").inc(100)
    grown: dict = {}
    add_delta(grown, before, scrape_of(metrics))

    counters = engine_counters(grown)
    assert counters["device_loads"] == 100 and counters["host_loads"] == 1
    # p50 is inside the (0.5, 1] ms bucket, p95 inside (2.5, 5] ms: never the 5 s load before.
    assert 0.5 < counters["device_load_p50_ms"] <= 1.0
    assert 2.5 < counters["device_load_p95_ms"] <= 5.0
    assert 25 < counters["host_load_p50_ms"] <= 50
    assert counters["prefix_cache_hit_rate"] == 0.25
    assert "device loads 100" in format_counters([{"name": "f: K=1", "server_counters": counters}])


def test_histogram_quantile_interpolates_inside_a_bucket_like_prometheus():
    samples = {("h_bucket", (("le", "1.0"),)): 0.0, ("h_bucket", (("le", "2.0"),)): 10.0,
               ("h_bucket", (("le", "+Inf"),)): 10.0}
    assert histogram_quantile(samples, "h", 0.5) == 1.5
    assert histogram_quantile({k: 0.0 for k in samples}, "h", 0.5) is None
    beyond = {**samples, ("h_bucket", (("le", "+Inf"),)): 20.0}
    assert histogram_quantile(beyond, "h", 0.9) == 2.0  # in +Inf: the largest finite bound
