"""vLLM's runtime LoRA endpoints on a real `adaptserve serve` process, driven as vLLM tools
drive them: plain JSON POSTs to the admin listener for load/unload, the `openai` client on
the inference listener. Adapters are made with plain PEFT in an import dir.

A load publishes a new version that serves at once (output = PEFT's greedy output for the
new weights); every refused load leaves the store and the listing exactly as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from openai import NotFoundError, OpenAI
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import metric
from tests.e2e.test_replicas import ADMIN

# Several 16-token blocks, so the prefix cache keeps this prompt's KV between requests.
PROMPT = "the quick brown fox jumps over the lazy dog " * 2
NEW_TOKENS = 8
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def outside(server_process, tmp_path_factory) -> Path:
    """A valid adapter outside every allowed folder."""
    directory = tmp_path_factory.mktemp("not-allowed") / "secret-adapter"
    shutil.copytree(server_process.imports / "step-1", directory)
    return directory


@pytest.fixture
def admin(server_process):
    with httpx.Client(base_url=server_process.admin_url, headers=ADMIN, timeout=60) as client:
        yield client


@pytest.fixture
def openai_client(server_process) -> OpenAI:
    return OpenAI(base_url=server_process.url + "/v1", api_key="unused", max_retries=0)


def peft_text(base: Path, adapter: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    batch = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ids = out[0, batch["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def complete(client: OpenAI, model: str):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)


def model_ids(client: OpenAI) -> set[str]:
    return {m.id for m in client.models.list()}


def test_load_reload_and_unload_as_a_training_loop_does(server_process, admin, openai_client, tiny_llama):
    imports = server_process.imports
    loaded = admin.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": str(imports / "step-1")})
    assert loaded.status_code == 200, loaded.text
    assert loaded.text == "Success: LoRA adapter 'policy' added successfully."
    assert "policy" in model_ids(openai_client)
    first = complete(openai_client, "policy")
    assert first.choices[0].text == peft_text(tiny_llama, imports / "step-1")
    assert complete(openai_client, "policy").choices[0].text == first.choices[0].text  # now from the prefix cache

    # The next step's weights under the same name (vLLM clients send load_inplace for this).
    again = admin.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": str(imports / "step-2"),
                                                       "load_inplace": True})
    assert again.status_code == 200, again.text
    # Same prompt, same name: nothing cached under step 1 (slot, prefix KV) may answer now.
    second = complete(openai_client, "policy")
    assert second.choices[0].text == peft_text(tiny_llama, imports / "step-2")
    assert second.choices[0].text != first.choices[0].text
    assert second.model != first.model  # policy@<version>: a new version answered
    listed = admin.get("/v1/adapters/policy").json()
    assert len(listed["versions"]) == 2 and second.model == f"policy@{listed['current']}"

    unloaded = admin.post("/v1/unload_lora_adapter", json={"lora_name": "policy", "lora_int_id": 1})
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'policy' removed successfully."
    assert "policy" not in model_ids(openai_client)
    with pytest.raises(NotFoundError):
        complete(openai_client, "policy")
    gone = admin.post("/v1/unload_lora_adapter", json={"lora_name": "policy"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found"


def test_symlinks_inside_the_allowed_folders_are_followed(server_process, admin, openai_client, tiny_llama):
    imports = server_process.imports
    # A Hugging Face cache snapshot: the folder is a link, and each file links into blobs/.
    hub = imports / "hub"
    (hub / "blobs").mkdir(parents=True)
    (hub / "snapshots" / "abc").mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(imports / "step-2" / name, hub / "blobs" / name)
        (hub / "snapshots" / "abc" / name).symlink_to(Path("../../blobs") / name)
    (imports / "latest").symlink_to(hub / "snapshots" / "abc")
    loaded = admin.post("/v1/load_lora_adapter", json={"lora_name": "linked", "lora_path": str(imports / "latest")})
    assert loaded.status_code == 200, loaded.text
    assert complete(openai_client, "linked").choices[0].text == peft_text(tiny_llama, imports / "step-2")
    # Stored as plain files: nothing in the store points back at the import dir.
    assert not any(p.is_symlink() for p in (server_process.store / "linked").rglob("*"))


def _refusals(imports: Path, outside: Path) -> dict[str, tuple[dict, int, str]]:
    escape = imports / "escape"
    escape.symlink_to(outside)
    smuggled = imports / "smuggled"
    smuggled.mkdir()
    shutil.copyfile(imports / "step-1" / FILES[0], smuggled / FILES[0])
    (smuggled / FILES[1]).symlink_to(outside / FILES[1])
    broken = imports / "broken"
    shutil.copytree(imports / "step-1", broken)
    config = json.loads((broken / FILES[0]).read_text())
    (broken / FILES[0]).write_text(json.dumps({**config, "r": 4096, "auto_map": {"AutoModel": "evil.Model"}}))
    (broken / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    piped = imports / "piped"  # a FIFO would hang a plain open() forever
    piped.mkdir()
    os.mkfifo(piped / FILES[0])
    shutil.copyfile(imports / "step-1" / FILES[1], piped / FILES[1])
    return {
        "outside": ({"lora_name": "x", "lora_path": str(outside)}, 403, "path_not_allowed"),
        "dot-dot": ({"lora_name": "x", "lora_path": f"{imports}/../{outside.parent.name}/{outside.name}"},
                    403, "path_not_allowed"),
        "etc": ({"lora_name": "x", "lora_path": "/etc"}, 403, "path_not_allowed"),
        "link-out": ({"lora_name": "x", "lora_path": str(escape)}, 403, "path_not_allowed"),
        "file-link-out": ({"lora_name": "x", "lora_path": str(smuggled)}, 403, "path_not_allowed"),
        "missing": ({"lora_name": "x", "lora_path": str(imports / "no-such-step")}, 404, "adapter_path_not_found"),
        "invalid": ({"lora_name": "x", "lora_path": str(broken)}, 422, "adapter_invalid"),
        "fifo": ({"lora_name": "x", "lora_path": str(piped)}, 422, "adapter_invalid"),
        "a-file": ({"lora_name": "x", "lora_path": str(imports / "step-1" / FILES[0])}, 422, "adapter_invalid"),
        "bad-name": ({"lora_name": "../x", "lora_path": str(imports / "step-1")}, 422, "adapter_invalid"),
        "no-path": ({"lora_name": "x"}, 400, "invalid_request"),
        "empty-name": ({"lora_name": "", "lora_path": str(imports / "step-1")}, 400, "invalid_request"),
        "unknown-field": ({"lora_name": "x", "lora_path": str(imports / "step-1"), "lora_int": 3},
                          400, "unknown_parameter"),
        "nul-byte": ({"lora_name": "x", "lora_path": f"{imports}/step-1\x00"}, 400, "invalid_request"),
    }


def _store_files(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_size for p in store.rglob("*") if p.is_file()}


def upload_errors(server_process) -> float:
    """adaptserve_adapter_uploads_total{outcome="error"}: the server's own failures."""
    with httpx.Client(base_url=server_process.url, timeout=30) as client:
        return metric(client, "adaptserve_adapter_uploads_total", outcome="error")


def test_refused_loads_say_why_and_change_nothing(server_process, admin, outside):
    cases = _refusals(server_process.imports, outside)
    before = (_store_files(server_process.store), admin.get("/v1/adapters").json())
    errors = upload_errors(server_process)
    for case, (body, status, code) in cases.items():
        response = admin.post("/v1/load_lora_adapter", json=body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (case, response.text)
    assert (_store_files(server_process.store), admin.get("/v1/adapters").json()) == before
    assert upload_errors(server_process) == errors  # every refusal here is the caller's, not the server's

    problems = admin.post("/v1/load_lora_adapter", json=cases["invalid"][0]).json()["error"]["details"]
    # Every problem in one answer, as an upload reports them.
    assert any("adapter_model.bin" in p and "pickle" in p for p in problems), problems
    assert any("auto_map" in p for p in problems), problems
    assert any("4096" in p for p in problems), problems
    # The 403 tells nothing about the file outside (it exists; the answer would be the same if not).
    assert str(outside) not in admin.post("/v1/load_lora_adapter", json=cases["link-out"][0]).text


def test_only_the_admin_listener_serves_them_and_only_with_the_token(server_process):
    body = {"lora_name": "x", "lora_path": str(server_process.imports / "step-1")}
    with httpx.Client(timeout=30) as client:
        # The inference listener has no management routes at all, whatever the token.
        assert client.post(server_process.url + "/v1/load_lora_adapter", json=body, headers=ADMIN).status_code == 404
        admin_url = server_process.admin_url
        assert client.post(admin_url + "/v1/load_lora_adapter", json=body).status_code == 401
        assert client.post(admin_url + "/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 401
    assert "x" not in os.listdir(server_process.store)
