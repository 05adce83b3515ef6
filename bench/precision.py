"""`python -m bench.precision`: what bf16 and int8 cost in quality against float32, on the CPU.

For each precision the default base is loaded as the server loads it and compared with
float32 on the same inputs:
  - greedy agreement: 56 prompts (chat questions through the template, and plain text),
    32 new tokens each; how many are identical to float32's, and the mean agreeing prefix;
  - logits: teacher-forced on float32's greedy continuation (prompt + 32 tokens), the max
    and mean |logit difference| over every position and vocabulary entry;
  - the example adapters' held-out metrics through a real server of that precision
    (`adaptserve eval --server`: date-iso exact match, ticket-routing accuracy).
It prints a table and writes JSON (bench/results/precision-<time>.json by default).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from adapters.bases import default_cache_dir
from bench.load import QUESTIONS, TOPICS
from bench.run import REPO_ROOT, RESULTS_DIR, free_port, log, server_process

PRECISIONS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("auto", "int8")}
NEW_TOKENS = 32


def prompts() -> list[tuple[str | None, list[dict] | None]]:
    """(prompt, messages) pairs: every chat question, and plain-text openings of essays and facts."""
    chat = [(None, [{"role": "user", "content": q}]) for q in QUESTIONS]
    plain = [(f"Write an essay about {topic}.", None) for topic in TOPICS]
    plain += [(f"Here are three facts about {topic}:", None) for topic in TOPICS]
    plain += [(f"Q: Explain {topic} to a child.\nA:", None) for topic in TOPICS]
    plain += [(line, None) for line in (
        "The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colours are",
        "SELECT name FROM users WHERE", "In 1492, Columbus", "Water boils at", "The quick brown fox",
        "My favourite recipe is", "To install the package, run", "The meeting is scheduled for",
        "Dear customer, thank you for", "The results of the experiment show", "In summary,",
        "The best way to learn a language is", "Step 1:")]
    return chat + plain


def engine_quality(cache_dir: Path) -> dict[str, Any]:
    import torch

    from server.contract import GenerationRequest, SamplingParams
    from server.engine.base import load_base
    from server.engine.engine import TorchEngine

    cases = prompts()
    outputs: dict[str, dict[int, list[int]]] = {}
    logits: dict[str, list[torch.Tensor]] = {}
    reference_ids: list[list[int]] = []
    for name, (dtype, quantize) in PRECISIONS.items():
        log(f"{name}: greedy answers to {len(cases)} prompts")
        base = load_base("smollm2-135m-instruct", cache_dir, "cpu", dtype, quantize)
        engine = TorchEngine(base, 32, 4096, 8)
        prompt_ids = [tuple(engine.tokenize(p, m)) for p, m in cases]
        for i, ids in enumerate(prompt_ids):
            engine.add(GenerationRequest(f"q{i}", ids, SamplingParams(max_new_tokens=NEW_TOKENS)))
        got: dict[int, list[int]] = {}
        while engine.has_work():
            for event in engine.step():
                got.setdefault(int(event.request_id[1:]), []).extend(event.token_ids)
        outputs[name] = got
        if name == "float32":
            reference_ids = [list(prompt_ids[i]) + got[i] for i in range(len(cases))]
        with torch.inference_mode():  # the model outside the engine's packed steps: plain SDPA
            logits[name] = [base.model(input_ids=torch.tensor([ids])).logits[0].float() for ids in reference_ids]
        del engine, base
    result: dict[str, Any] = {"prompts": len(cases), "new_tokens": NEW_TOKENS}
    for name in PRECISIONS:
        if name == "float32":
            continue
        prefixes = []
        for i in range(len(cases)):
            ours, ref = outputs[name][i], outputs["float32"][i]
            prefixes.append(next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref))))
        diffs = [(a - b).abs() for a, b in zip(logits[name], logits["float32"])]
        result[name] = {
            "identical_answers": sum(o == outputs["float32"][i] for i, o in outputs[name].items()),
            "mean_agreeing_prefix": round(sum(prefixes) / len(prefixes), 2),
            "max_abs_logit_diff": round(max(float(d.max()) for d in diffs), 3),
            "mean_abs_logit_diff": round(sum(float(d.mean()) for d in diffs) / len(diffs), 4),
        }
    return result


def served_metrics(name: str, dtype: str, quantize: str, workdir: Path) -> dict[str, Any]:
    from trainer.eval_server import evaluate_server

    port = free_port()
    argv = ["-m", "server.cli", "serve", "--port", str(port), "--adapters-dir", str(workdir / name),
            "--dtype", dtype, "--quantize", quantize, "--drain-timeout-s", "1"]
    with server_process(name, argv, port, workdir / f"{name}.log", 300) as server:
        date = evaluate_server(str(REPO_ROOT / "examples/data/date-iso/test.jsonl"), server.url, "date-iso",
                               max_new_tokens=16, progress=False)
        tickets = evaluate_server(str(REPO_ROOT / "examples/data/ticket-routing/test.jsonl"), server.url,
                                  "ticket-routing", progress=False)
    return {"date-iso exact_match": date["adapter"]["exact_match"],
            "ticket-routing accuracy": tickets["adapter"]["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir().parent)
    parser.add_argument("--skip-served", action="store_true", help="only the engine-level comparison")
    parser.add_argument("--output", type=Path, default=None)
    options = parser.parse_args(argv)
    started = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = options.output or RESULTS_DIR / f"precision-{started}.json"
    report: dict[str, Any] = {"started": started, "engine": engine_quality(options.cache_dir)}
    if not options.skip_served:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="adaptserve-precision-") as tmp:
            report["served"] = {}
            for name, (dtype, quantize) in PRECISIONS.items():
                log(f"{name}: the example adapters' held-out metrics through a server")
                report["served"][name] = served_metrics(name, dtype, quantize, Path(tmp))
    print(f"{'precision':10} {'identical':>10} {'prefix':>7} {'max|dlogit|':>12} {'mean|dlogit|':>13} "
          f"{'date-iso EM':>12} {'tickets acc':>12}")
    for name in PRECISIONS:
        row = report["engine"].get(name, {})
        served = report.get("served", {}).get(name, {})
        cells = [f"{row['identical_answers']}/{report['engine']['prompts']}" if row else "ref", row.get("mean_agreeing_prefix", "-"),
                 row.get("max_abs_logit_diff", "-"), row.get("mean_abs_logit_diff", "-"),
                 served.get("date-iso exact_match", "-"), served.get("ticket-routing accuracy", "-")]
        print(f"{name:10} {cells[0]:>10} {cells[1]!s:>7} {cells[2]!s:>12} {cells[3]!s:>13} {cells[4]!s:>12} {cells[5]!s:>12}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
