"""lm-evaluation-harness against a real server process equals the harness's own `hf` backend.

The two local tasks in examples/lm_eval (multiple choice, scored by log-likelihood through
/v1/completions with echo and logprobs; and generate_until, greedy up to a newline) run with
`local-completions` against `adaptserve serve` on the tiny model, for the base and for a
PEFT adapter, and with `hf` (+ `peft=`) on the same files. Tolerance: every choice's
log-likelihood within 1e-3 (fp32 sums over a few tokens of log-softmax values that agree to
1e-4 each), and the same scores (one multiple-choice item may flip only on a near-tie, which
the per-choice check would show).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.test_replicas import start_replica, stop

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "examples" / "lm_eval"
LL_TOLERANCE = 1e-3

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """The example tasks, run from a copy so that their relative data paths resolve."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    for path in TASKS.iterdir():
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def server(tiny_llama, llama_adapters, tmp_path_factory):
    store = tmp_path_factory.mktemp("lm-eval-store")
    shutil.copytree(llama_adapters["gen-a"], store / "gen-a")
    replica = start_replica(tiny_llama, store, tmp_path_factory.mktemp("lm-eval-srv"), "lm-eval")
    yield replica
    stop(replica)


def evaluate(model: str, model_args: dict, tasks: Path, monkeypatch) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tasks)
    return simple_evaluate(model=model, model_args=model_args, tasks=["adaptserve_trivia_mc", "adaptserve_dates_gen"],
                           task_manager=TaskManager(include_path=str(tasks)), log_samples=True, limit=None,
                           bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


@pytest.mark.parametrize("adapter", [None, "gen-a"], ids=["base", "adapter"])
def test_harness_scores_through_the_server_equal_the_hf_backend(server, tasks, tiny_llama, llama_adapters,
                                                                adapter, monkeypatch):
    served = evaluate("local-completions", {
        "base_url": server.url + "/v1/completions", "model": adapter or str(tiny_llama),
        "tokenizer_backend": "huggingface", "tokenizer": str(tiny_llama), "tokenized_requests": True,
        "max_length": 256, "num_concurrent": 1, "max_retries": 1,
    }, tasks, monkeypatch)
    hf_args = {"pretrained": str(tiny_llama), "dtype": "float32", "device": "cpu", "batch_size": 1, "max_length": 256}
    if adapter:
        hf_args["peft"] = str(llama_adapters[adapter])
    local = evaluate("hf", hf_args, tasks, monkeypatch)

    for task, metric in (("adaptserve_trivia_mc", "acc,none"), ("adaptserve_dates_gen", "exact_match,none")):
        assert served["results"][task][metric] == local["results"][task][metric], task
    by_doc = lambda run: {s["doc_id"]: s for s in run["samples"]["adaptserve_trivia_mc"]}  # noqa: E731
    served_mc, local_mc = by_doc(served), by_doc(local)
    assert served_mc.keys() == local_mc.keys() and len(served_mc) == 12
    for doc_id, sample in served_mc.items():
        ours = [ll for ll, _ in (r[0] for r in sample["resps"])]
        theirs = [ll for ll, _ in (r[0] for r in local_mc[doc_id]["resps"])]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < LL_TOLERANCE, (doc_id, ours, theirs)
    served_gen = {s["doc_id"]: s["resps"][0][0] for s in served["samples"]["adaptserve_dates_gen"]}
    local_gen = {s["doc_id"]: s["resps"][0][0] for s in local["samples"]["adaptserve_dates_gen"]}
    assert served_gen == local_gen  # greedy text, token for token
