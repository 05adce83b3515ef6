"""`adaptserve soak`: N clients for M minutes against a running server on this machine.

Each client loops over a weighted mix of generate, streamed generate, classify, adapter
uploads and deletes (its own `soak-*` names, so clients never race each other's deletes)
across the adapters the server has. At the end it reports errors by type (only 429s, the
server's deliberate overload answer, are allowed), latency percentiles per operation, the
server's RSS over time (growth after warm-up must stay under a stated bound), and whether
the adapter state is consistent: the registry listing against what the soak left, against
the store on disk (with --adapters-dir), and no engine rows left running.

Loopback only, and bounded in both time and requests: this is a tool for the operator's
own server, not a load generator to point elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.report import percentile

UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Operation weights; classify and upload/delete drop out when the server/options lack them.
MIX = {"generate": 35, "stream": 30, "classify": 15, "upload": 12, "delete": 8}
PROMPTS = ("the quick brown fox", "adapters change what a small model says", "one two three four",
           "paris is the capital of", "select name from users where")
WINDOW_S = 10.0  # p95 latency is plotted per window of this many seconds


@dataclass
class Record:
    op: str
    started: float  # seconds since the soak began
    latency_s: float
    status: int  # 0 = transport error (connection refused/reset, timeout)
    code: str | None  # the server's error code, or the exception's type for status 0


def is_loopback_url(url: str) -> bool:
    from server.auth import is_loopback_host

    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and is_loopback_host(parts.hostname)


def server_pid(port: int) -> int | None:
    """The process listening on `port` (this machine), for RSS sampling."""
    import psutil

    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return conn.pid
    return None


class Soak:
    def __init__(self, options: argparse.Namespace, admin_token: str | None):
        self.options = options
        self.admin = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self.inference = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else self.admin
        self.records: list[Record] = []
        self.rss: list[tuple[float, int]] = []
        self.started = 0.0
        self.deadline = 0.0
        self.generators: list[str | None] = [None]
        self.classifiers: list[str] = []
        self.uploaded: set[str] = set()  # soak adapters that should exist at the end
        self.deleted: set[str] = set()
        self.sources = sorted(p for p in (options.upload_from.iterdir() if options.upload_from else ())
                              if all((p / f).is_file() for f in UPLOAD_FILES))
        self._serial = 0

    # --- one request ---------------------------------------------------------------------

    async def _timed(self, op: str, send) -> httpx.Response | None:
        began = time.monotonic()
        try:
            response = await send()
        except httpx.HTTPError as exc:
            self.records.append(Record(op, began - self.started, time.monotonic() - began, 0, type(exc).__name__))
            return None
        code = None
        if response.status_code >= 400:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = response.json()["error"]["code"]
        self.records.append(Record(op, began - self.started, time.monotonic() - began, response.status_code, code))
        return response

    async def generate(self, http: httpx.AsyncClient, rng: random.Random, client: int) -> None:
        # Only this client's uploads: another client may be deleting its own right now.
        adapter = rng.choice(self.generators + sorted(n for n in self.uploaded if n.startswith(f"soak-{client}-")))
        body = {"prompt": rng.choice(PROMPTS), "max_new_tokens": rng.randint(1, self.options.max_new_tokens)}
        if adapter:
            body["adapter"] = adapter
        await self._timed("generate", lambda: http.post("/v1/generate", json=body, headers=self.inference))

    async def stream(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        adapter = rng.choice(self.generators)
        body = {"prompt": rng.choice(PROMPTS), "max_new_tokens": self.options.max_new_tokens, "stream": True}
        if adapter:
            body["adapter"] = adapter

        async def send() -> httpx.Response:
            async with http.stream("POST", "/v1/generate", json=body, headers=self.inference) as response:
                if response.status_code != 200:
                    await response.aread()  # an error answer is one JSON body
                    return response
                final = None
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        final = json.loads(line[6:])
            if final is None or "error" in final:
                # A 200 whose stream ended in an error event is a failure all the same.
                return httpx.Response(500, json={"error": {"code": "stream_error"}})
            return response

        await self._timed("stream", send)

    async def classify(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        body = {"adapter": rng.choice(self.classifiers), "inputs": rng.sample(PROMPTS, 2)}
        await self._timed("classify", lambda: http.post("/v1/classify", json=body, headers=self.inference))

    async def upload(self, http: httpx.AsyncClient, rng: random.Random, client: int) -> None:
        if len([n for n in self.uploaded if n.startswith(f"soak-{client}-")]) >= 3:
            return await self.delete(http, rng, client)  # keeps the store small on long runs
        self._serial += 1
        name = f"soak-{client}-{self._serial}"
        source = rng.choice(self.sources)
        files = [(f, (f, (source / f).read_bytes())) for f in UPLOAD_FILES]
        response = await self._timed("upload", lambda: http.post(
            "/v1/adapters", data={"name": name}, files=files, headers=self.admin))
        if response is not None and response.status_code in (200, 201):
            self.uploaded.add(name)

    async def delete(self, http: httpx.AsyncClient, rng: random.Random, client: int) -> None:
        mine = sorted(n for n in self.uploaded if n.startswith(f"soak-{client}-"))
        if not mine:
            return await self.upload(http, rng, client)
        name = rng.choice(mine)
        response = await self._timed("delete", lambda: http.delete(f"/v1/adapters/{name}", headers=self.admin))
        if response is not None and response.status_code == 200:
            self.uploaded.discard(name)
            self.deleted.add(name)

    # --- the run ---------------------------------------------------------------------------

    async def client(self, index: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(index)
        mix = dict(MIX)
        if not self.classifiers:
            mix.pop("classify")
        if not self.sources or not self.admin:
            mix.pop("upload"), mix.pop("delete")
        ops, weights = list(mix), list(mix.values())
        while time.monotonic() < self.deadline and len(self.records) < self.options.max_requests:
            op = rng.choices(ops, weights)[0]
            if op in ("generate", "upload", "delete"):
                await getattr(self, op)(http, rng, index)
            else:
                await getattr(self, op)(http, rng)

    async def sample_rss(self, pid: int | None) -> None:
        if pid is None:
            return
        import psutil

        process = psutil.Process(pid)
        while time.monotonic() < self.deadline:
            self.rss.append((time.monotonic() - self.started, process.memory_info().rss))
            await asyncio.sleep(1.0)

    async def discover(self, http: httpx.AsyncClient) -> None:
        listed = await http.get("/v1/adapters", headers=self.admin)
        if listed.status_code == 200:
            for entry in listed.json()["adapters"]:
                task = entry["versions"][0]["task"] if entry["versions"] else None
                if entry["name"].startswith("soak-"):
                    continue  # debris of an earlier soak: not ours to rely on
                (self.classifiers if task == "classify" else self.generators).append(entry["name"])
        else:
            models = (await http.get("/v1/models", headers=self.inference)).json()["data"]
            self.generators += [m["id"] for m in models if m.get("parent")]

    async def run(self) -> dict[str, Any]:
        options = self.options
        limits = httpx.Limits(max_connections=options.clients + 4)
        async with httpx.AsyncClient(base_url=options.url, timeout=options.timeout, limits=limits) as http:
            await self.discover(http)
            pid = options.pid or server_pid(urlsplit(options.url).port or 80)
            self.started = time.monotonic()
            self.deadline = self.started + options.minutes * 60
            await asyncio.gather(self.sample_rss(pid), *(self.client(i, http) for i in range(options.clients)))
            elapsed = time.monotonic() - self.started
            consistency = await self.check_state(http)
        return self.summary(elapsed, pid, consistency)

    async def check_state(self, http: httpx.AsyncClient) -> dict[str, Any]:
        problems: list[str] = []
        listed: set[str] = set()
        if self.admin:
            response = await http.get("/v1/adapters", headers=self.admin)
            entries = {e["name"]: e for e in response.json()["adapters"]}
            listed = {n for n in entries if n.startswith("soak-")}
            problems += [f"uploaded {n} is not listed" for n in sorted(self.uploaded - listed)]
            problems += [f"deleted {n} is still listed" for n in sorted(self.deleted & listed)]
            if self.options.adapters_dir is not None:
                on_disk = {p.name for p in self.options.adapters_dir.iterdir()
                           if not p.name.startswith(".") and p.is_dir()}
                problems += [f"{n} listed but not on disk" for n in sorted(set(entries) - on_disk)]
                problems += [f"{n} on disk but not listed" for n in sorted(on_disk - set(entries))
                             if n not in {r["name"] for r in response.json()["rejected"]}]
                for name, entry in entries.items():
                    current = self.options.adapters_dir / name / "CURRENT"
                    if current.is_file() and current.read_text().strip() != entry["current"]:
                        problems.append(f"{name}: CURRENT on disk differs from the listing")
                debris = [p for p in (self.options.adapters_dir / ".tmp").rglob("*") if p.is_file()]
                problems += [f"staging debris {p}" for p in debris]
        metrics = (await http.get("/metrics")).text
        running = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", metrics, re.M)
        if running and float(running.group(1)) != 0:
            problems.append(f"{running.group(1)} engine rows still running after the soak")
        return {"consistent": not problems, "problems": problems, "soak_adapters_left": sorted(listed)}

    def summary(self, elapsed: float, pid: int | None, consistency: dict[str, Any]) -> dict[str, Any]:
        options = self.options
        errors: dict[str, int] = {}
        throttled = 0
        for r in self.records:
            if r.status == 429:
                throttled += 1
            elif r.status == 0 or r.status >= 400:
                key = f"{r.op} {r.status} {r.code}"
                errors[key] = errors.get(key, 0) + 1
        ops = {}
        for op in MIX:
            latencies = [r.latency_s for r in self.records if r.op == op and 200 <= r.status < 300]
            if latencies:
                ops[op] = {"ok": len(latencies), **{f"p{q}_s": round(percentile(latencies, q), 3)
                                                     for q in (50, 95, 99)}, "max_s": round(max(latencies), 3)}
        warm = [b for t, b in self.rss if t >= options.warmup_s]
        growth_mb = (max(warm) - warm[0]) / 2**20 if len(warm) > 1 else None
        rss_ok = growth_mb is None or growth_mb <= options.rss_growth_mb
        return {
            "url": options.url, "clients": options.clients, "minutes": options.minutes, "elapsed_s": round(elapsed, 1),
            "requests": len(self.records), "requests_per_s": round(len(self.records) / elapsed, 2) if elapsed else None,
            "throttled_429": throttled, "errors": errors, "operations": ops, "server_pid": pid,
            "rss": {"start_mb": round(self.rss[0][1] / 2**20, 1) if self.rss else None,
                    "after_warmup_mb": round(warm[0] / 2**20, 1) if warm else None,
                    "peak_mb": round(max(b for _, b in self.rss) / 2**20, 1) if self.rss else None,
                    "growth_after_warmup_mb": round(growth_mb, 1) if growth_mb is not None else None,
                    "bound_mb": options.rss_growth_mb, "within_bound": rss_ok},
            "consistency": consistency,
            "passed": not errors and rss_ok and consistency["consistent"],
            "rss_samples": [(round(t, 1), b) for t, b in self.rss],
            "records": [asdict(r) for r in self.records],
        }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"soak: {result['clients']} clients, {result['elapsed_s']:.0f} s, {result['requests']} requests "
             f"({result['requests_per_s']} req/s), 429s: {result['throttled_429']}",
             f"{'operation':<10} {'ok':>6} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'max s':>7}"]
    for op, row in result["operations"].items():
        lines.append(f"{op:<10} {row['ok']:>6} {row['p50_s']:>7.3f} {row['p95_s']:>7.3f} {row['p99_s']:>7.3f} "
                     f"{row['max_s']:>7.3f}")
    lines.append("errors: " + (", ".join(f"{k} x{v}" for k, v in sorted(result["errors"].items())) or "none"))
    rss = result["rss"]
    lines.append(f"RSS MB: start {rss['start_mb']}, after warm-up {rss['after_warmup_mb']}, peak {rss['peak_mb']}, "
                 f"growth after warm-up {rss['growth_after_warmup_mb']} (bound {rss['bound_mb']}): "
                 f"{'ok' if rss['within_bound'] else 'EXCEEDED'}")
    state = result["consistency"]
    lines.append("adapter state: " + ("consistent" if state["consistent"] else "; ".join(state["problems"])))
    lines.append("PASSED" if result["passed"] else "FAILED")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rss_axis, latency_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    samples = result["rss_samples"]
    rss_axis.plot([t for t, _ in samples], [b / 2**20 for _, b in samples])
    rss_axis.axvline(result["warmup_s"], color="grey", linestyle=":", label="end of warm-up")
    rss_axis.legend(loc="lower right", fontsize="small")
    rss_axis.set_ylabel("server RSS (MB)")
    for op in result["operations"]:
        windows: dict[int, list[float]] = {}
        for r in result["records"]:
            if r["op"] == op and 200 <= r["status"] < 300:
                windows.setdefault(int(r["started"] // WINDOW_S), []).append(r["latency_s"])
        keys = sorted(windows)
        latency_axis.plot([(k + 0.5) * WINDOW_S for k in keys], [percentile(windows[k], 95) for k in keys],
                          marker=".", label=op)
    latency_axis.set_ylabel(f"p95 latency (s) per {WINDOW_S:.0f} s")
    latency_axis.set_xlabel("seconds since start")
    latency_axis.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptserve soak", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (N), at most 256")
    parser.add_argument("--minutes", type=float, default=3.0, help="how long (M), at most 24 h")
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--admin-token", default=os.environ.get("ADAPTSERVE_ADMIN_TOKEN"),
                        help="for uploads/deletes and the final listing (default: <adapters-dir>/.admin-token)")
    parser.add_argument("--api-key", default=None, help="inference key, if the server wants one")
    parser.add_argument("--adapters-dir", type=Path, default=None,
                        help="the server's store: compared with the listing at the end")
    parser.add_argument("--upload-from", type=Path, default=None,
                        help="a folder of PEFT adapter folders to upload (and later delete) as soak-* names")
    parser.add_argument("--warmup-s", type=float, default=30.0, help="RSS growth is measured after this")
    parser.add_argument("--rss-growth-mb", type=float, default=256.0, help="allowed RSS growth after warm-up")
    parser.add_argument("--pid", type=int, default=None, help="server pid (default: found by the port)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/soak-<time>.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if not is_loopback_url(options.url):
        print(f"refusing {options.url}: soak only targets a server on this machine (loopback)", file=sys.stderr)
        return 2
    if not (1 <= options.clients <= 256 and 0 < options.minutes <= 24 * 60 and options.max_requests > 0):
        print("bounds: 1..256 clients, 0..1440 minutes, at least one request", file=sys.stderr)
        return 2
    admin_token = options.admin_token
    if admin_token is None and options.adapters_dir is not None:
        generated = options.adapters_dir / ".admin-token"  # written by a server with no token configured
        admin_token = generated.read_text().strip() if generated.is_file() else None
    soak = Soak(options, admin_token)
    result = asyncio.run(soak.run())
    result["warmup_s"] = options.warmup_s
    output = options.output or Path("bench/results") / time.strftime("soak-%Y%m%d-%H%M%S.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    png = output.with_suffix(".png")
    plot(result, png)
    print(format_table(result))
    print(f"wrote {output} and {png}")
    return 0 if result["passed"] else 1
