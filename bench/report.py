"""Numbers out of request records: percentiles, per-run summaries, the table and the JSON file.

Kept free of networking and servers so it is unit-tested on its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from prometheus_client.parser import text_string_to_metric_families


ABANDONED = "abandoned"  # finish_reason of a request still running when its round ended


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it; times are seconds on the client's monotonic clock."""

    start: float
    end: float
    ttft: float  # first streamed text, or the whole latency when the server does not stream
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    streamed: bool
    error: str | None = None
    # When each generated token reached the client: one entry per streamed event, the rest
    # of `completion_tokens` at `end`. Lets throughput count tokens inside a window even
    # for requests that started before it or were still running after it.
    token_times: tuple[float, ...] = ()
    # A deliberately shortened first request of a client (see LoadSpec.stagger): its tokens
    # are real load, but its latency says nothing about a full-length request.
    warmup: bool = False

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def measured(self) -> bool:
        """A full-length request that finished: the ones latency percentiles are taken over."""
        return self.error is None and self.finish_reason != ABANDONED and not self.warmup


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(records: Sequence[RequestRecord], windows: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Throughput and latency over `windows` (several = interleaved rounds of one scenario).

    Throughput counts tokens by the time they reached the client, so a window shorter than
    one request still measures the server's rate. A window ends at its last token: for a
    server that answers in one piece (no streaming) the time after its last answer holds
    work whose tokens are not visible yet, and counting it would understate the rate.
    TTFT is over every request sent inside a window whose first token arrived (its length
    does not matter to it; requests sent before the window start include the cold first
    prefill of the whole batch). Latency is over full-length requests that finished inside.
    """
    tokens, window = 0, 0.0
    for start, end in windows:
        times = [t for r in records if r.error is None for t in r.token_times if start <= t <= end]
        tokens += len(times)
        window += (max(times) if times else end) - start
    inside = [r for r in records if any(start <= r.end <= end for start, end in windows)]
    done = [r for r in inside if r.measured]
    errors = [r for r in inside if r.error is not None]
    rate = tokens / window if window > 0 else 0.0
    mean_completion = sum(r.completion_tokens for r in done) / len(done) if done else None

    def rounded(value: float | None, digits: int = 3) -> float | None:
        return None if value is None else round(value, digits)

    latencies = [r.latency for r in done]
    sent_inside = [r for r in records if any(start <= r.start <= end for start, end in windows)]
    ttfts = [r.ttft for r in sent_inside if r.error is None and r.token_times]
    return {
        "window_s": round(window, 2),
        "completed": len(done),
        "errors": len(errors),
        "error_examples": sorted({r.error for r in errors})[:3],
        "tokens_per_s": rounded(rate, 2),
        # From the token rate: counting completions would let the shortened warm-up requests
        # (or, for a serial server, the few answers of a short window) skew it.
        "requests_per_s": rounded(rate / mean_completion) if mean_completion else None,
        "ttft_p50_s": rounded(percentile(ttfts, 50)),
        "ttft_p95_s": rounded(percentile(ttfts, 95)),
        "ttft_is_latency": bool(ttfts) and not any(r.streamed for r in sent_inside),
        "latency_p50_s": rounded(percentile(latencies, 50)),
        "latency_p95_s": rounded(percentile(latencies, 95)),
        "mean_prompt_tokens": rounded(sum(r.prompt_tokens for r in done) / len(done), 1) if done else None,
        "mean_completion_tokens": rounded(mean_completion, 1) if done else None,
    }


# --- the server's own counters ----------------------------------------------------------

# One sample of a /metrics scrape: (name, sorted labels) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def add_delta(total: Samples, before: Samples, after: Samples) -> None:
    """Adds what each counter and histogram series grew by between two scrapes into `total`
    (gauges are not meaningful as differences; callers read only counters and histograms)."""
    for key, value in after.items():
        total[key] = total.get(key, 0.0) + value - before.get(key, 0.0)


def histogram_quantile(samples: Samples, name: str, q: float, **labels: str) -> float | None:
    """Prometheus' histogram_quantile over one series' cumulative buckets: linear inside the
    bucket holding the q-th observation (from 0 for the first); the largest finite bound if it
    falls in +Inf; None without observations."""
    buckets = sorted((float(dict(key)["le"]), count) for (sample, key), count in samples.items()
                     if sample == f"{name}_bucket" and {k: v for k, v in key if k != "le"} == labels)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, lower, below = q * buckets[-1][1], 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        lower, below = bound, count
    return lower


def engine_counters(samples: Samples) -> dict[str, Any]:
    """What the server counted during a run: loads into each adapter tier (how many, p50/p95 in
    ms from the histogram's buckets) and the share of prompt tokens the prefix cache served."""
    def total(name: str, **labels: str) -> float:
        return sum(v for (sample, key), v in samples.items()
                   if sample == name and labels.items() <= dict(key).items())

    out: dict[str, Any] = {}
    for tier, label in (("device", "device"), ("cpu", "host")):
        loads = int(total("adaptserve_adapter_load_seconds_count", tier=tier))
        out[f"{label}_loads"] = loads
        for q in (50, 95):
            seconds = histogram_quantile(samples, "adaptserve_adapter_load_seconds", q / 100, tier=tier)
            out[f"{label}_load_p{q}_ms"] = None if seconds is None or not loads else round(seconds * 1000, 2)
    queries = total("vllm:prefix_cache_queries_total")
    out["prefix_cache_hit_rate"] = round(total("vllm:prefix_cache_hits_total") / queries, 3) if queries else None
    return out


def format_counters(runs: Sequence[dict[str, Any]]) -> str:
    """One line per run that has server counters (adaptserve; the naive server has none)."""
    lines = []
    for run in runs:
        c = run.get("server_counters")
        if not c:
            continue
        ms = lambda key: "-" if c.get(key) is None else f"{c[key]:g} ms"  # noqa: E731
        hit = "-" if c.get("prefix_cache_hit_rate") is None else f"{c['prefix_cache_hit_rate']:.0%}"
        lines.append(f"  {run['name']}: device loads {c['device_loads']} (p50 {ms('device_load_p50_ms')}, "
                     f"p95 {ms('device_load_p95_ms')}); host loads {c['host_loads']} (p50 "
                     f"{ms('host_load_p50_ms')}, p95 {ms('host_load_p95_ms')}); prefix cache served {hit} "
                     "of prompt tokens")
    return "\n".join(lines)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, summary key, format)
    ("run", "name", "{}"),
    ("server", "server", "{}"),
    ("C", "concurrency", "{}"),
    ("K", "adapters", "{}"),
    ("done", "completed", "{}"),
    ("tok/s", "tokens_per_s", "{:.1f}"),
    ("req/s", "requests_per_s", "{:.2f}"),
    ("TTFT p50", "ttft_p50_s", "{:.2f}"),
    ("TTFT p95", "ttft_p95_s", "{:.2f}"),
    ("lat p50", "latency_p50_s", "{:.2f}"),
    ("lat p95", "latency_p95_s", "{:.2f}"),
    ("in tok", "mean_prompt_tokens", "{:.0f}"),
    ("out tok", "mean_completion_tokens", "{:.0f}"),
    ("RSS MB", "peak_rss_mb", "{:.0f}"),
)


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text table, one line per run; a '*' marks TTFT that is the full latency."""
    header = [title for title, _, _ in COLUMNS]
    lines = []
    for run in runs:
        cells = []
        for _, key, fmt in COLUMNS:
            value = run.get(key)
            cell = "-" if value is None else fmt.format(value)
            if key.startswith("ttft") and run.get("ttft_is_latency") and value is not None:
                cell += "*"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(cell.rjust(width) for cell, width in zip(row, widths))  # noqa: E731
    out = [render(header), render(["-" * w for w in widths])] + [render(row) for row in lines]
    if any(run.get("ttft_is_latency") for run in runs):
        out.append("* the server streams nothing: TTFT is the full request latency")
    return "\n".join(out)


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    goal: float
    higher_is_better: bool = True

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def line(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        value = "n/a" if self.value is None else f"{self.value:.3g}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        return f"{self.name}: {value} (target {sign} {self.goal:g}) {verdict}"


def write_json(path: Path, meta: dict[str, Any], runs: Sequence[dict[str, Any]], targets: Sequence[Target]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": meta,
        "runs": list(runs),
        "targets": [{**asdict(t), "met": t.met} for t in targets],
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
