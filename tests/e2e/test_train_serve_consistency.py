"""Train -> push -> a real `adaptserve serve` process: the served metric equals the report's.

Three tiny adapters memorise a word swap, one per row shape. Each is asked over HTTP in the
shape README documents for its rows ({"input","target"} and {"prompt","completion"}: a plain
`prompt`; chat rows: `messages`), natively and through the `openai` client, and the exact
match must equal the training report's within 0.02. The request shown in the report (curl
and openai) answers what the served evaluation measured; `adaptserve eval --server` gives
the same figure; the other shape is answered with a warning naming the trained one; an
adapter made with plain PEFT answers without any.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import make_lora
from tests.e2e.test_replicas import TOKEN, launch_replica, wait_ready
from trainer.cli import main as trainer
from trainer.eval_server import evaluate_server
from trainer.metrics import generation_metrics
from trainer.report import HELD_OUT_FILE

TOLERANCE = 0.02
PAIRS = [("quick", "fox"), ("lazy", "dog"), ("brown", "jumps"), ("over", "the"), ("small", "model"), ("adapters", "change")]
ROWS = {
    "swap-io": [{"input": f"swap {a} {b}", "target": f"{b} {a}"} for a, b in PAIRS],
    "swap-pc": [{"prompt": f"swap {a} {b} =", "completion": f" {b} {a}"} for a, b in PAIRS],
    "swap-chat": [{"messages": [{"role": "system", "content": "swap"}, {"role": "user", "content": f"{a} {b}"},
                                {"role": "assistant", "content": f"{b} {a}"}]} for a, b in PAIRS],
}
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Served:
    url: str
    folders: dict[str, Path]  # adapter name -> the folder `adaptserve train` wrote


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory) -> Served:
    """A server process booting while each adapter is trained with `adaptserve train` (defaults but
    for a tiny, fast schedule), then pushed to it with `adaptserve push`, as a user would."""
    root = tmp_path_factory.mktemp("consistency")
    replica = launch_replica(tiny_llama, root / "store", root, "consistency")
    try:
        folders = {}
        for name, rows in ROWS.items():
            data = root / f"{name}.jsonl"
            data.write_text("".join(json.dumps(row) + "\n" for row in rows * 4))
            folders[name] = root / name
            assert trainer(["train", str(data), "-o", str(folders[name]), "--base", str(tiny_llama), "--max-steps", "60",
                            "--validation-fraction", "0.25", "--batch-size", "6", "--eval-steps", "1000", "--lr", "0.02",
                            "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-length", "48", "--threads", "1",
                            "--no-base-eval"]) == 0
        elsewhere = make_lora(tiny_llama, root / "elsewhere", seed=5, weight_scale=3.0)
        wait_ready(replica)
        for folder in [*folders.values(), elsewhere]:
            assert trainer(["push", str(folder), "--server", replica.url, "--token", TOKEN]) == 0
        yield Served(replica.url, folders)
    finally:
        replica.process.kill()  # nothing to drain: every request here has been answered
        replica.process.wait()


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _held_out(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / HELD_OUT_FILE).read_text().splitlines()]


def _native(url: str, body: dict) -> dict:
    response = httpx.post(url + "/v1/generate", json={"max_new_tokens": MAX_NEW_TOKENS, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("name, prompt_key, answer_key", [("swap-io", "input", "target"),
                                                         ("swap-pc", "prompt", "completion")])
def test_raw_rows_are_answered_from_a_plain_prompt_as_the_report_says(served, name, prompt_key, answer_key):
    rows, reported = _held_out(served.folders[name]), _report(served.folders[name])["metrics"]["exact_match"]
    references = [row[answer_key] for row in rows]
    native = [_native(served.url, {"adapter": name, "prompt": row[prompt_key]}) for row in rows]
    assert all(answer["warnings"] == [] for answer in native)
    assert abs(generation_metrics([a["text"] for a in native], references)["exact_match"] - reported) <= TOLERANCE
    with _client(served.url) as client:
        completions = [client.completions.create(model=name, prompt=row[prompt_key], max_tokens=MAX_NEW_TOKENS,
                                                 temperature=0) for row in rows]
        # The other shape is answered, with a warning that names the trained one.
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": rows[0][prompt_key]}],
                                              max_tokens=MAX_NEW_TOKENS, temperature=0)
    exact_match = generation_metrics([c.choices[0].text for c in completions], references)["exact_match"]
    assert abs(exact_match - reported) <= TOLERANCE
    assert reported >= 0.8  # the tiny model did memorise its rows: the comparison means something
    assert [(w["code"], w["trained_on"]) for w in chat.warnings] == [("prompt_format_mismatch", "prompt")]


def test_chat_rows_are_answered_from_messages_as_the_report_says(served):
    name = "swap-chat"
    rows, reported = _held_out(served.folders[name]), _report(served.folders[name])["metrics"]["exact_match"]
    prompts = [row["messages"][:-1] for row in rows]
    references = [row["messages"][-1]["content"] for row in rows]
    native = [_native(served.url, {"adapter": name, "messages": messages}) for messages in prompts]
    assert all(answer["warnings"] == [] for answer in native)
    assert abs(generation_metrics([a["text"] for a in native], references)["exact_match"] - reported) <= TOLERANCE
    with _client(served.url) as client:
        replies = [client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_NEW_TOKENS,
                                                  temperature=0) for messages in prompts]
    exact_match = generation_metrics([r.choices[0].message.content for r in replies], references)["exact_match"]
    assert abs(exact_match - reported) <= TOLERANCE and reported >= 0.8
    assert all(r.warnings == [] for r in replies)
    flagged = _native(served.url, {"adapter": name, "prompt": prompts[0][-1]["content"]})["warnings"]
    assert [(w["code"], w["trained_on"]) for w in flagged] == [("prompt_format_mismatch", "messages")]
    no_system = _native(served.url, {"adapter": name, "messages": prompts[0][1:]})["warnings"]
    assert [w["code"] for w in no_system] == ["system_prompt_mismatch"]


@pytest.mark.parametrize("name", list(ROWS))
def test_eval_server_confirms_the_reported_figure(served, name, capsys):
    report = _report(served.folders[name])
    results = evaluate_server(report["request"]["held_out_file"], served.url, name, max_new_tokens=MAX_NEW_TOKENS,
                              progress=False)
    assert results["served"]["version"] == report["adapter"]["version"]
    assert abs(results["adapter"]["exact_match"] - report["metrics"]["exact_match"]) <= TOLERANCE
    assert abs(results["adapter"]["token_f1"] - report["metrics"]["token_f1"]) <= TOLERANCE
    assert results["adapter"]["warned_responses"] == 0 and results["base"]["examples"] == len(_held_out(served.folders[name]))
    # The request the eval sends for the first row is the one the report shows.
    assert results["request"] == report["request"]["native"]
    # The command line prints the same figure, base beside.
    assert trainer(["eval", report["request"]["held_out_file"], "--server", served.url, "--adapter", name, "--api", "openai",
                    "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert abs(printed["adapter"]["exact_match"] - report["metrics"]["exact_match"]) <= TOLERANCE


def test_the_reports_curl_and_openai_requests_reproduce_the_served_answer(served):
    request = _report(served.folders["swap-chat"])["request"]
    reference = request["reference"].strip()
    curl = request["curl"].replace("http://127.0.0.1:8000", served.url)
    answered = json.loads(subprocess.run(curl, shell=True, capture_output=True, text=True, check=True).stdout)
    assert answered["text"].strip() == reference and answered["warnings"] == []
    snippet = request["openai_python"].replace("http://127.0.0.1:8000", served.url)
    printed = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True,
                             env={**os.environ, "OPENAI_MAX_RETRIES": "0"}).stdout
    assert printed.strip() == reference


def test_an_adapter_made_elsewhere_answers_both_shapes_without_warnings(served):
    card = httpx.get(served.url + "/v1/models/elsewhere", timeout=30).json()
    assert card["prompt_format"] is None
    assert _native(served.url, {"adapter": "elsewhere", "prompt": "swap quick fox"})["warnings"] == []
    assert _native(served.url, {"adapter": "elsewhere", "messages": [{"role": "user", "content": "quick fox"}]})["warnings"] == []
    # Without a recorded format, `eval --server` asks each row in its own shape.
    for name, field in (("swap-io", "prompt"), ("swap-chat", "messages")):
        held_out = served.folders[name] / HELD_OUT_FILE
        results = evaluate_server(str(held_out), served.url, "elsewhere", max_new_tokens=4, progress=False)
        assert field in results["request"]["body"] and results["adapter"]["warned_responses"] == 0


def test_eval_server_names_what_went_wrong(served, capsys):
    held_out = str(served.folders["swap-io"] / HELD_OUT_FILE)
    assert trainer(["eval", held_out, "--server", served.url, "--adapter", "no-such-adapter"]) == 1
    assert "serves no adapter 'no-such-adapter'" in capsys.readouterr().err
    assert trainer(["eval", held_out, "--server", served.url, "--adapter", "swap-io", "--task", "classify"]) == 1
    assert "is a generate adapter" in capsys.readouterr().err
