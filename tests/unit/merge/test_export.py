"""adapters.export: the merged standalone model generates exactly what the server serves
with the adapter (greedy, fp32), and a quantized serving base gets a measured drift figure."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.export import REPORT_FILE, export_merged, main, resolve_adapter

PROMPTS = ["paris is the", "the quick brown fox"]


def greedy(model_dir, prompt: str, max_new_tokens: int = 12) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("adapter", ["gen-b", "mix-cli"])
def test_exported_model_equals_the_served_adapter(routed_replicas, tiny_llama, tmp_path, adapter):
    a, _ = routed_replicas
    store = a.services.settings.adapters_dir
    with a.client(headers={"Authorization": "Bearer admin-secret"}) as client:
        if adapter == "mix-cli":  # a stored merge exports like any adapter
            stored = client.post("/v1/adapters/merge", json={
                "name": adapter, "sources": [{"name": "gen-a", "weight": 0.5}, {"name": "gen-c", "weight": 1.0}]})
            assert stored.status_code in (200, 201), stored.text
        served = [client.post("/v1/generate", json={"prompt": p, "max_new_tokens": 12, "adapter": adapter}).json()
                  for p in PROMPTS]
    out = tmp_path / "export"
    assert main(["--adapter", adapter, "--out", str(out), "--base-model", str(tiny_llama),
                 "--adapters-dir", str(store)]) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["adapter"] == f"{adapter}@{served[0]['adapter']['version']}"
    assert not list(out.glob("adapter_*")), "the export is a plain model, not an adapter"
    for prompt, answer in zip(PROMPTS, served):
        assert greedy(out, prompt) == answer["text"]


def test_quantized_serving_base_reports_drift(routed_replicas, tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    name, folder = resolve_adapter("gen-a", routed_replicas[0].services.settings.adapters_dir)
    report = export_merged(folder, name, str(tiny_llama), tmp_path / "q", serving_quantization="int8")
    print(f"\nint8 serving base vs fp32 export: relative logit error {report.drift_relative_logit_error:.4f}, "
          f"next-token agreement {report.drift_next_token_agreement:.0%}")
    assert 0 < report.drift_relative_logit_error < 1
    assert json.loads((tmp_path / "q" / REPORT_FILE).read_text())["serving_quantization"] == "int8"
