"""Command line: `train`, `eval`, `compare`, `push`. `adaptserve <command>` delegates here via main(argv)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from trainer.config import METHODS, TrainConfig
from trainer.prompt_format import PROMPT_FORMAT_CHOICES

EXIT_USAGE = 2


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    # Every default is None so that only flags actually given override the config file.
    add = parser.add_argument
    add("train_file", nargs="?", help="JSONL (generation or classification) or CSV (classification); for "
        "image-classify an image folder (one subfolder per class) or a CSV/JSONL of path,label")
    add("--config", help="YAML/JSON file of training options (flags override it)")
    add("--output-dir", "-o", dest="output_dir", help="adapter folder to write")
    add("--task", choices=["generate", "classify", "image-classify"])
    add("--validation-file", dest="validation_file", help="held-out data; split off the training file when absent")
    add("--validation-fraction", dest="validation_fraction", type=float)
    add("--name", help="adapter name (default: the output folder's name)")
    add("--base", help="built-in base (smollm2-135m-instruct, minilm-l6), a local folder or a hub id")
    add("--method", choices=METHODS)
    add("--rank", "-r", type=int)
    add("--alpha", type=int)
    add("--dropout", type=float)
    add("--target-modules", dest="target_modules", help="'all-linear' or a comma-separated list of module names")
    add("--num-virtual-tokens", dest="num_virtual_tokens", type=int)
    add("--last-n-layers", dest="last_n_layers", type=int)
    add("--quantize", choices=["none", "nf4"], help="nf4 = QLoRA (bitsandbytes; meant for CUDA)")
    add("--prompt-format", dest="prompt_format", choices=PROMPT_FORMAT_CHOICES,
        help="generation: auto (default) = input/target and prompt/completion rows as raw text, answered from "
             "`prompt`; messages rows through the chat template, answered from `messages`. chat = wrap raw rows "
             "as one user turn (served through `messages`)")
    add("--epochs", type=float)
    add("--max-steps", dest="max_steps", type=int)
    add("--batch-size", dest="batch_size", type=int)
    add("--gradient-accumulation", dest="gradient_accumulation", type=int)
    add("--learning-rate", "--lr", dest="learning_rate", type=float)
    add("--weight-decay", dest="weight_decay", type=float)
    add("--warmup-ratio", dest="warmup_ratio", type=float)
    add("--max-length", dest="max_length", type=int)
    add("--eval-steps", dest="eval_steps", type=int)
    add("--early-stopping-patience", dest="early_stopping_patience", type=int)
    add("--seeds", type=int, metavar="N", help="train N times (seeds 0..N-1) and report mean ± std")
    add("--seed", type=int, help="the single seed to use")
    add("--resume", action="store_true", default=None, help="continue from the last checkpoint in OUTPUT/checkpoints")
    add("--max-new-tokens", dest="max_new_tokens", type=int)
    add("--eval-batch-size", dest="eval_batch_size", type=int)
    add("--threads", dest="num_threads", type=int, help="torch CPU threads")
    add("--no-base-eval", dest="evaluate_base", action="store_false", default=None, help="skip measuring the base")


def _training_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        key: value
        for key, value in vars(args).items()
        if key not in ("command", "config", "seeds", "seed", "methods", "verbose")
    }
    if args.seeds is not None and args.seed is not None:
        raise ValueError("give --seeds N or --seed S, not both")
    if args.seeds is not None:
        overrides["seeds"] = list(range(args.seeds))
    elif args.seed is not None:
        overrides["seeds"] = [args.seed]
    return TrainConfig.from_sources(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptserve", description="Train, evaluate, compare and push adapters.")
    parser.add_argument("--verbose", "-v", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune an adapter; writes a serve-ready folder")
    _add_training_options(train)

    compare = commands.add_parser("compare", help="train one task with several methods and tabulate them")
    _add_training_options(compare)
    compare.add_argument("--methods", help="comma-separated (default: last-n-layers,lora,dora,ia3,prompt-tuning)")

    evaluate = commands.add_parser("eval", help="held-out metrics of an adapter (or the bare base), base beside")
    evaluate.add_argument("data_file")
    evaluate.add_argument("--adapter", help="adapter folder; with --server, the served adapter's name (omit: the bare base)")
    evaluate.add_argument("--server", help="measure through a running server's HTTP API instead, e.g. http://127.0.0.1:8000")
    evaluate.add_argument("--api", choices=["native", "openai"], default="native",
                          help="with --server: /v1/generate (native) or /v1/completions and /v1/chat/completions")
    evaluate.add_argument("--api-key", help="with --server: an inference API key, when the server requires one")
    evaluate.add_argument("--concurrency", type=int, default=8, help="with --server: requests in flight")
    evaluate.add_argument("--base", help="override the base named in the adapter's manifest (offline only)")
    evaluate.add_argument("--task", choices=["generate", "classify"])
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--json", dest="as_json", action="store_true", help="print the full metrics as JSON")

    push = commands.add_parser("push", help="upload an adapter folder to a running server")
    push.add_argument("directory")
    push.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    push.add_argument("--token", help="admin token (default: $ADAPTSERVE_ADMIN_TOKEN)")
    push.add_argument("--name", help="adapter name (default: manifest name, else folder name)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        # DataError is a ValueError: its message lists file:line: reason for every bad row.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _train(args: argparse.Namespace) -> int:
    from trainer.methods import serving_summary
    from trainer.report import write_outputs
    from trainer.training import is_main_process, run_training

    config = _training_config(args)
    if config.task == "image-classify":
        from trainer.vision import run_image_training

        outcome = run_image_training(config)
    else:
        outcome = run_training(config)
    if not is_main_process():
        return 0
    report = write_outputs(outcome)
    headline = report["headline_metric"]
    summary = report["summary"][headline]
    base = (report["base_metrics"] or {}).get(headline)
    print(f"wrote {config.output_dir}")
    print(
        f"held-out {headline}: adapter {summary['mean']:.3f} ± {summary['std']:.3f}"
        + (f", base {base:.3f}" if base is not None else "")
    )
    if "adapter" in report:
        print(f"adapter {report['adapter']['name']}@{report['adapter']['version']} ({report['adapter']['size_bytes'] / 1e6:.2f} MB)")
    print(f"serving: {report['serving']['level']} ({report['serving']['reason']})")
    print(serving_summary())
    print(f"ask it with `{report['request']['field']}`: {report['request']['curl']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from trainer.compare import COMPARE_MD, DEFAULT_IMAGE_METHODS, DEFAULT_METHODS, compare_methods

    config = _training_config(args)
    defaults = DEFAULT_IMAGE_METHODS if config.task == "image-classify" else DEFAULT_METHODS
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(defaults)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    compare_methods(config, methods)
    print(open(f"{config.output_dir}/{COMPARE_MD}").read())
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.server:
        from trainer.eval_server import ServerEvalError, evaluate_server

        try:
            results = evaluate_server(
                args.data_file, args.server, args.adapter, task=args.task, max_new_tokens=args.max_new_tokens,
                api=args.api, api_key=args.api_key, concurrency=args.concurrency,
            )
        except ServerEvalError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    else:
        from trainer.eval_adapter import evaluate_adapter

        results = evaluate_adapter(
            args.data_file, args.adapter, base=args.base, task=args.task, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
    if args.as_json:
        print(json.dumps(results, indent=2))
        return 0
    _print_metrics(results)
    return 0


def _print_metrics(results: dict) -> None:
    keys = ("exact_match", "token_f1", "perplexity") if results["task"] == "generate" else ("accuracy", "macro_f1")
    columns = [(title, results[title]) for title in ("base", "adapter") if results.get(title) is not None]
    if "server" in results:
        served = results.get("served")
        print(f"through {results['server']} ({results['api']} API)"
              + (f", adapter {served['name']}@{served['version']}" if served else "")
              + f", asked with `{results['request']['path']}`: {json.dumps(results['request']['body'])[:200]}")
    print(f"{'metric':<12}" + "".join(f" {title:>10}" for title, _ in columns))
    for key in keys:
        # Over HTTP there are no token log-probabilities: perplexity is offline only.
        cells = "".join(f" {m[key]:>10.4f}" if key in m else f" {'–':>10}" for _, m in columns)
        print(f"{key:<12}{cells}")
    for title, metrics in columns:
        if metrics.get("warned_responses"):
            print(f"note: {metrics['warned_responses']} {title} response(s) carried a warning: {metrics['warning']}")


def _push(args: argparse.Namespace) -> int:
    from trainer.push import PushError, push_adapter

    try:
        answer = push_adapter(args.directory, args.server, args.token, name=args.name)
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{answer.get('name')}@{answer.get('version')}")
    return 0


COMMANDS = {"train": _train, "compare": _compare, "eval": _eval, "push": _push}

if __name__ == "__main__":
    sys.exit(main())
