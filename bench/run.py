"""`adaptserve bench`: adaptserve against a naive PEFT server, same base, same load, one run.

Scenarios (C concurrent closed-loop clients, K distinct adapters):
  (a) C=32, K=8, 64 new tokens: adaptserve vs the naive server (throughput, TTFT);
  (b) the same load all on the base vs all on adapters (the cost of batched LoRA);
  (c) K=1 vs K=32 distinct adapters (does cost grow with the adapter count?);
  (d) chat traffic: short questions as chat messages through the base's template (with its
      default system prompt), answers of natural length (ending at EOS), K=8, vs the naive server;
  (e) shared prefixes: 8 tenants, each with its own ~300-token system prompt and adapter, short
      questions: the prefix cache on against off;
  (f) 500 adapters in the store (r=8 on q/v), picked uniformly or by Zipf(1) popularity,
      against one adapter, all at default settings;
  (p) (not in the default set) precisions side by side: float32, bfloat16 and int8 servers,
      C clients over K adapters and a single stream.
(a)-(c) and (f) ask for 64 tokens of an essay (the model keeps writing, so every answer is
64 tokens); (d) and (e) are the shape of real traffic. Servers run as subprocesses on
127.0.0.1 and take turns under load, so the one measured gets every core. Adapters are random
PEFT LoRAs made for the base in a temporary store, plus the shipped example `date-iso` in (d).

    adaptserve bench --quick      # one round, ~12 minutes on 2 cores
    adaptserve bench              # three interleaved rounds, ~36 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil

from bench.load import QUESTIONS, LoadSpec, RequestMix, make_prompts, run_load, tenant_system_prompt
from bench.report import (
    RequestRecord,
    Samples,
    Target,
    add_delta,
    engine_counters,
    format_counters,
    format_table,
    parse_samples,
    ratio,
    summarize,
    write_json,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
CANONICAL_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Every linear kind of a Llama-style block: the adapters touch all of them, the worst case
# for LoRA overhead.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- adapters -------------------------------------------------------------------------


def make_adapters(store: Path, count: int, ranks: tuple[int, ...], base_model: str) -> list[str]:
    """`count` PEFT LoRA adapters with random non-zero A and B, saved as PEFT saves them.

    B is scaled down from PEFT's uniform init so the adapted model still writes prose: an
    adapter that drives the model to emit EOS early (or never) would change the amount of
    work per request and blur the base-vs-adapter comparison.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.bases import resolve_base

    base = AutoModelForCausalLM.from_pretrained(resolve_base(base_model).path, dtype=torch.float32)
    names = []
    for i in range(count):
        name = f"bench-{i:02d}"
        rank = ranks[i % len(ranks)]
        torch.manual_seed(1000 + i)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_MODULES),
            init_lora_weights=False, task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
        with torch.no_grad():
            for module_name, parameter in model.named_parameters():
                if "lora_B" in module_name:
                    parameter.mul_(0.05)
        model.peft_config["default"].base_model_name_or_path = CANONICAL_BASE_ID
        model.save_pretrained(store / name)
        base = model.unload()  # back to the plain base for the next adapter
        names.append(name)
    return names


def make_many_adapters(store: Path, count: int, base_model: str, rank: int = 8) -> list[str]:
    """`count` r=`rank` LoRAs on q_proj and v_proj: one saved by PEFT, the others its exact
    file layout with fresh random weights (PEFT takes a second per adapter; this, milliseconds)."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from adapters.bases import resolve_base

    base = AutoModelForCausalLM.from_pretrained(resolve_base(base_model).path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = CANONICAL_BASE_ID
    template = store / "many-000"
    model.save_pretrained(template)
    tensors = load_file(str(template / "adapter_model.safetensors"))
    adapter_config = json.loads((template / "adapter_config.json").read_text())
    names = ["many-000"]
    for i in range(1, count):
        generator = torch.Generator().manual_seed(5000 + i)
        fresh = {key: torch.randn(t.shape, generator=generator) * (0.05 if "lora_B" in key else 1.0) / t.shape[-1] ** 0.5
                 for key, t in tensors.items()}
        folder = store / f"many-{i:03d}"
        folder.mkdir()
        save_file(fresh, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
        names.append(folder.name)
        if i % 100 == 0:
            log(f"  {i}/{count} adapters written")
    return names


def copy_example(store: Path, name: str) -> str:
    """A shipped example adapter (trained by `adaptserve train`) as a plain PEFT folder."""
    import shutil

    source = REPO_ROOT / "adapters" / "examples" / name
    shutil.copytree(source, store / name, ignore=shutil.ignore_patterns("*.md", "*.png", "*.json.lock"))
    return name


# --- servers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen


@contextlib.contextmanager
def server_process(name: str, argv: list[str], port: int, log_path: Path, ready_timeout_s: float) -> Iterator[Server]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, *argv], cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, process, ready_timeout_s, log_path)
            yield Server(name, url, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode} before ready; see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                log(f"  ready in {time.monotonic() - started:.0f} s")
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout_s:.0f} s; see {log_path}")


def settle(server: Server, timeout_s: float = 120.0) -> float | None:
    """Wait until the server has no running or waiting rows; seconds it took, None if it can't say.

    Rows whose clients left must be freed within a step; rows still running here would eat
    into the next scenario, so this both keeps scenarios apart and checks cancellation.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        response = httpx.get(f"{server.url}/metrics", timeout=10)
        if response.status_code != 200:
            return None  # the naive server has no metrics (it drops gone clients by itself)
        busy = [line for line in response.text.splitlines()
                if line.startswith(("adaptserve_running_rows ", "adaptserve_queue_depth ")) and float(line.split()[-1])]
        if not busy:
            return time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit(f"{server.name} still has rows {timeout_s:.0f} s after its clients left")


def scrape(server: Server) -> Samples | None:
    """The server's /metrics as samples; None for a server without them (the naive one)."""
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    return parse_samples(response.text) if response.status_code == 200 else None


async def sample_peak_rss(pid: int, stop: asyncio.Event, every_s: float = 0.5) -> int:
    """Largest RSS of the server process seen while `stop` is unset (bytes)."""
    process, peak = psutil.Process(pid), 0
    while not stop.is_set():
        peak = max(peak, process.memory_info().rss)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    return peak


# --- scenarios ------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    server: str  # a key of SERVERS
    mix: RequestMix
    measure_s: float  # counted seconds, split evenly over the rounds
    warmup_s: float  # per round, not counted
    max_new_tokens: int = 64
    # Every answer runs to max_new_tokens (the essay prompts): stagger the clients' first
    # requests so rows do not finish in lockstep. Natural-length answers spread by themselves.
    stagger: bool = True
    concurrency: int | None = None  # None: --concurrency

    @property
    def adapter_count(self) -> int:
        return len(set(self.mix.adapters) - {None})


# Which server process a scenario runs against, and what sets it apart.
SERVERS = {
    "naive": "the naive PEFT server (one request at a time)",
    "adaptserve": "adaptserve with the scenario's adapters",
    "adaptserve-no-prefix-cache": "adaptserve with --prefix-cache-bytes 0",
    "adaptserve-many": "adaptserve at default settings over a store of many adapters",
    "adaptserve-bfloat16": "adaptserve with --dtype bfloat16",
    "adaptserve-int8": "adaptserve with --quantize int8",
}


@dataclass
class Measured:
    records: list[RequestRecord]
    windows: list[tuple[float, float]]
    peak_rss: int = 0
    # What the server's counters and histograms grew by over the rounds (its adapter loads,
    # its prefix-cache hits); empty for a server without /metrics.
    counters: Samples = field(default_factory=dict)


def measure_round(server: Server, scenario: Scenario, options: argparse.Namespace,
                  into: Measured, label: str) -> None:
    measured_s = scenario.measure_s / options.rounds
    spec = LoadSpec(
        concurrency=scenario.concurrency or options.concurrency,
        mix=scenario.mix,
        max_new_tokens=scenario.max_new_tokens,
        duration_s=scenario.warmup_s + measured_s,
        stagger=scenario.stagger and scenario.server != "naive",
    )
    log(f"[{scenario.name}] {label}{server.name}: C={spec.concurrency}, K={scenario.adapter_count}, "
        f"{spec.duration_s:.0f} s (first {scenario.warmup_s:.0f} s not counted)")

    def progress(elapsed: float, records: list[RequestRecord]) -> None:
        # Tokens of finished requests only: a rough running figure, the table has the real one.
        counted = sum(1 for r in records for t in r.token_times if t - t_start >= scenario.warmup_s)
        rate = f"{counted / (elapsed - scenario.warmup_s):6.1f} tok/s" if elapsed > scenario.warmup_s else "warming up"
        errors = sum(r.error is not None for r in records)
        log(f"  {elapsed:5.0f} s  {len(records):4d} done  {errors} errors  {rate}")

    async def go() -> tuple[float, list[RequestRecord], int]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_peak_rss(server.process.pid, stop))
        t0, records = await run_load(server.url, spec, progress)
        stop.set()
        return t0, records, await sampler

    before = scrape(server)
    t_start = time.monotonic()  # within ms of run_load's own t0; only for the progress lines
    t0, records, peak_rss = asyncio.run(go())
    settled = settle(server)
    if settled is not None and settled > 2.0:
        log(f"  rows outlived their clients by {settled:.1f} s")
    if before is not None:
        # Includes the warm-up seconds: loads happen mostly then, and they are what is asked.
        add_delta(into.counters, before, scrape(server) or {})
    into.records.extend(records)
    into.windows.append((t0 + scenario.warmup_s, t0 + spec.duration_s))
    into.peak_rss = max(into.peak_rss, peak_rss)


def result_row(scenario: Scenario, measured: Measured, options: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": scenario.name,
        "server": scenario.server,
        "concurrency": scenario.concurrency or options.concurrency,
        "adapters": scenario.adapter_count,
        "max_new_tokens": scenario.max_new_tokens,
        "traffic": "chat" if scenario.mix.questions else "essay",
        "rounds": len(measured.windows),
        "peak_rss_mb": round(measured.peak_rss / 2**20, 1),
        "server_counters": engine_counters(measured.counters) if measured.counters else None,
        **summarize(measured.records, measured.windows),
        # The spread between rounds is the noise floor of every ratio built on this row.
        "round_tokens_per_s": [summarize(measured.records, [w])["tokens_per_s"] for w in measured.windows],
    }


def find_run(runs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next((r for r in runs if r["name"] == name), {})


def targets_for(runs: list[dict[str, Any]], options: argparse.Namespace) -> list[Target]:
    k, many, store = options.adapters, options.many_adapters, options.store_adapters
    run = lambda name: find_run(runs, name)  # noqa: E731
    tps = lambda name: run(name).get("tokens_per_s")  # noqa: E731
    return [
        Target("(a) throughput vs naive", ratio(tps(f"a: K={k}"), tps(f"a: naive K={k}")), 10.0),
        Target("(a) TTFT p50 s", run(f"a: K={k}").get("ttft_p50_s"), 1.5, higher_is_better=False),
        Target("(b) adapters / base", ratio(tps(f"a: K={k}"), tps("b: base")), 0.85),
        Target(f"(c) K={many} / K=1", ratio(tps(f"c: K={many}"), tps("c: K=1")), 0.9),
        Target("(d) chat throughput vs naive", ratio(tps(f"d: chat K={k}"), tps(f"d: naive chat K={k}")), 8.0),
        Target("(e) TTFT p50 cache hit / miss", ratio(run("e: prefix cache on").get("ttft_p50_s"),
                                                       run("e: prefix cache off").get("ttft_p50_s")),
               0.3, higher_is_better=False),
        Target("(e) throughput cache on / off", ratio(tps("e: prefix cache on"), tps("e: prefix cache off")), 1.5),
        Target(f"(f) {store} adapters uniform / K=1", ratio(tps(f"f: {store} uniform"), tps("f: K=1")), 0.85),
        Target(f"(f) {store} adapters Zipf(1) / K=1", ratio(tps(f"f: {store} zipf"), tps("f: K=1")), 0.85),
        Target(f"(f) TTFT p95 {store} uniform / K=1", ratio(run(f"f: {store} uniform").get("ttft_p95_s"),
                                                            run("f: K=1").get("ttft_p95_s")),
               1.5, higher_is_better=False),
        Target(f"(p) bf16 / float32, K={k}", ratio(tps(f"p: bfloat16 K={k}"), tps(f"p: float32 K={k}")), 1.8),
        Target("(p) bf16 / float32, single stream", ratio(tps("p: bfloat16 single stream"),
                                                            tps("p: float32 single stream")), 1.6),
        Target(f"(p) int8 / float32, K={k}", ratio(tps(f"p: int8 K={k}"), tps(f"p: float32 K={k}")), 1.0),
        Target("(p) int8 / float32, single stream", ratio(tps("p: int8 single stream"),
                                                            tps("p: float32 single stream")), 1.0),
    ]


@dataclass(frozen=True)
class Adapters:
    """The bench's adapters by use: random LoRAs for (a)-(c), the chat set (d), the tenants' (e),
    and the large store (f)."""

    random: list[str]
    chat: list[str]
    tenants: list[str]
    many: list[str]


def plan_scenarios(options: argparse.Namespace, adapters: Adapters) -> list[Scenario]:
    wanted = set(options.scenarios.split(","))
    essays = make_prompts(options.prompt_tokens)
    k_names = tuple(adapters.random[: options.adapters])

    def ours(name: str, mix: RequestMix, server: str = "adaptserve", **extra) -> Scenario:
        return Scenario(name, server, mix, options.measure, options.warmup,
                        **{"max_new_tokens": options.max_new_tokens, **extra})

    def essay(names) -> RequestMix:
        return RequestMix(tuple(names), prompts=essays)

    plan = []
    if "a" in wanted:
        plan.append(Scenario(f"a: naive K={options.adapters}", "naive", essay(k_names),
                             options.naive_measure, options.naive_warmup, options.max_new_tokens))
    if "b" in wanted:
        plan.append(ours("b: base", essay((None,))))
    if wanted & {"a", "b"}:
        plan.append(ours(f"a: K={options.adapters}", essay(k_names)))  # also the adapter side of (b)
    if "c" in wanted:
        plan.append(ours("c: K=1", essay(adapters.random[:1])))
        plan.append(ours(f"c: K={options.many_adapters}", essay(adapters.random[: options.many_adapters])))
    natural = dict(max_new_tokens=options.chat_max_new_tokens, stagger=False)  # (d), (e): answers end at EOS
    if "d" in wanted:
        chat = RequestMix(tuple(adapters.chat), questions=QUESTIONS)
        plan.append(Scenario(f"d: naive chat K={options.adapters}", "naive", chat, options.naive_measure,
                             options.naive_warmup, **natural))
        plan.append(ours(f"d: chat K={options.adapters}", chat, **natural))
    if "e" in wanted:
        systems = {name: tenant_system_prompt(i, options.system_prompt_tokens) for i, name in enumerate(adapters.tenants)}
        tenants = RequestMix(tuple(adapters.tenants), questions=QUESTIONS, system_prompts=systems)
        plan.append(ours("e: prefix cache on", tenants, **natural))
        plan.append(ours("e: prefix cache off", tenants, "adaptserve-no-prefix-cache", **natural))
    if "p" in wanted:
        # Precisions side by side: C clients over K adapters, and one client alone.
        for server, label in (("adaptserve", options.dtype if options.dtype != "auto" else "float32"),
                              ("adaptserve-bfloat16", "bfloat16"), ("adaptserve-int8", "int8")):
            plan.append(ours(f"p: {label} K={options.adapters}", essay(k_names), server))
            plan.append(ours(f"p: {label} single stream", essay(k_names[:1]), server, concurrency=1, stagger=False))
    if "f" in wanted:
        many = tuple(adapters.many)
        plan.append(ours("f: K=1", essay(many[:1]), "adaptserve-many"))
        plan.append(ours(f"f: {len(many)} uniform", essay(many), "adaptserve-many"))
        plan.append(ours(f"f: {len(many)} zipf", RequestMix(many, prompts=essays, popularity="zipf"), "adaptserve-many"))
    return plan


# --- command --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptserve bench", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="one short round: about 12 minutes in all")
    parser.add_argument("--scenarios", default="a,b,c,d,e,f", help="which of a..f and p (precisions: float32, "
                        "bfloat16, int8 side by side) to run, comma-separated")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (C)")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters in (a) and (b) (K)")
    parser.add_argument("--many-adapters", type=int, default=32, help="K of the large side of (c)")
    parser.add_argument("--ranks", default="8,16", help="LoRA ranks, assigned to adapters in turn")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per essay answer: (a)-(c), (f)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="approximate essay prompt length")
    parser.add_argument("--chat-max-new-tokens", type=int, default=256,
                        help="cap of a chat answer in (d) and (e), which ends at EOS well before it")
    parser.add_argument("--system-prompt-tokens", type=int, default=300, help="each tenant's system prompt in (e)")
    parser.add_argument("--store-adapters", type=int, default=500, help="adapters in the store of (f)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of every scenario, so load from other users of the "
                        "machine falls on all of them alike (default 3, --quick 1)")
    parser.add_argument("--measure", type=float, default=None,
                        help="counted seconds per adaptserve scenario, over all rounds (default 120, --quick 40); "
                        "latency needs rounds longer than one request (~40 s at C=32 on 2 cores)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="uncounted seconds at the start of each round (default 10, --quick 8)")
    parser.add_argument("--naive-measure", type=float, default=None,
                        help="counted seconds for the naive server, which needs ~10 s per request "
                        "(default 150, --quick 60)")
    parser.add_argument("--naive-warmup", type=float, default=0.0,
                        help="a serial server is in its steady state from the first request on")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of both servers; 0 = all cores. On a machine other work "
                        "keeps busy, 1 can be steadier: an op on 2+ threads waits for the slowest "
                        "thread to be scheduled")
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", help="adaptserve's --dtype (the naive server stays float32)")
    parser.add_argument("--quantize", default="auto", help="adaptserve's --quantize")
    parser.add_argument("--prefix-cache-bytes", type=int, default=None,
                        help="adaptserve's --prefix-cache-bytes (default: the server's); (e) turns it off on its "
                        "second server whatever this says")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a server may take to start")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/<time>.json)")
    return parser


def _defaults(options: argparse.Namespace) -> None:
    for key, full, quick in (
        ("rounds", 3, 1), ("measure", 120, 40), ("warmup", 10, 8), ("naive_measure", 150, 60),
    ):
        if getattr(options, key) is None:
            setattr(options, key, quick if options.quick else full)


def _meta(options: argparse.Namespace, argv: list[str], started: str) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return {
        "started": started,
        "command": "adaptserve bench " + " ".join(argv),
        "git_commit": commit.stdout.strip() or None,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()},
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        # The machine is shared: a high load average before or after explains a noisy run.
        "load_average": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = build_parser().parse_args(argv)
    _defaults(options)
    started = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = options.output or RESULTS_DIR / f"{started}.json"
    meta = _meta(options, argv, started)
    wanted = set(options.scenarios.split(","))
    if options.threads != 1 and meta["load_average"][0] >= (os.cpu_count() or 1):
        log(f"note: load average {meta['load_average'][0]:.1f} on {os.cpu_count()} CPUs; with other work "
            "running, figures will be noisy (--threads 1 can be steadier)")

    with tempfile.TemporaryDirectory(prefix="adaptserve-bench-") as tmp, contextlib.ExitStack() as servers:
        tmp_path = Path(tmp)
        store, naive_store, many_store = tmp_path / "store", tmp_path / "naive-store", tmp_path / "many-store"
        count = max(options.adapters, options.many_adapters if "c" in wanted else 0)
        log(f"making {count} random LoRA adapters (r={options.ranks}, all 7 linear kinds) in {store}")
        names = make_adapters(store, count, tuple(int(r) for r in options.ranks.split(",")), options.base_model)
        # (d): the trained example first, then random ones to make K.
        chat = [copy_example(store, "date-iso")] + names[: options.adapters - 1] if "d" in wanted else []
        many = []
        if "f" in wanted:
            many_store.mkdir()
            log(f"making {options.store_adapters} LoRA adapters (r=8 on q_proj, v_proj) in {many_store}")
            many = make_many_adapters(many_store, options.store_adapters, options.base_model)
        plan = plan_scenarios(options, Adapters(names, chat, names[: options.adapters], many))

        cache = [] if options.prefix_cache_bytes is None else ["--prefix-cache-bytes", str(options.prefix_cache_bytes)]

        def adaptserve(key: str, adapters_dir: Path, *extra: str) -> None:
            port = free_port()
            log(f"starting {SERVERS[key]}")
            running[key] = servers.enter_context(server_process(
                key,
                ["-m", "server.cli", "serve", "--port", str(port), "--adapters-dir", str(adapters_dir),
                 "--base-model", options.base_model, "--max-batch-size", str(options.concurrency),
                 "--no-install-example-adapters", "--drain-timeout-s", "1", "--threads", str(options.threads),
                 "--dtype", options.dtype, "--quantize", options.quantize, *cache, *extra],
                port, output.with_suffix(f".{key}.log"), options.ready_timeout,
            ))

        # Every server stays up for the whole run and they take turns: an idle server costs no
        # CPU, and interleaving lets a noisy neighbour hit every scenario alike.
        running: dict[str, Server] = {}
        needed = {s.server for s in plan}
        if "naive" in needed:
            # The naive server loads every adapter it finds; give it only the ones it serves.
            naive_store.mkdir()
            served = {a for s in plan if s.server == "naive" for a in s.mix.adapters if a is not None}
            for name in sorted(served):
                (naive_store / name).symlink_to(store / name, target_is_directory=True)
            port = free_port()
            log(f"starting {SERVERS['naive']}")
            running["naive"] = servers.enter_context(server_process(
                "naive",
                ["-m", "bench.naive_server", "--port", str(port), "--adapters-dir", str(naive_store),
                 "--base-model", options.base_model, "--threads", str(options.threads)],
                port, output.with_suffix(".naive.log"), options.ready_timeout,
            ))
        if "adaptserve" in needed:
            adaptserve("adaptserve", store)
        if "adaptserve-no-prefix-cache" in needed:
            adaptserve("adaptserve-no-prefix-cache", store, "--prefix-cache-bytes", "0")
        if "adaptserve-many" in needed:
            adaptserve("adaptserve-many", many_store)
        if "adaptserve-bfloat16" in needed:
            adaptserve("adaptserve-bfloat16", store, "--dtype", "bfloat16")
        if "adaptserve-int8" in needed:
            adaptserve("adaptserve-int8", store, "--quantize", "int8")

        measured = {s.name: Measured([], []) for s in plan}
        for round_index in range(options.rounds):
            label = f"round {round_index + 1}/{options.rounds} " if options.rounds > 1 else ""
            for scenario in plan:
                measure_round(running[scenario.server], scenario, options, measured[scenario.name], label)

    runs = [result_row(s, measured[s.name], options) for s in plan]
    meta["load_average_after"] = list(os.getloadavg())
    targets = targets_for(runs, options)
    print(format_table(runs))
    print(format_counters(runs))
    if options.rounds > 1:
        for run in runs:
            print(f"  {run['name']}: tok/s by round {run['round_tokens_per_s']}")
    print()
    for target in targets:
        if target.value is not None:
            print(target.line())
    write_json(output, meta, runs, targets)
    print(f"\nwritten: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
