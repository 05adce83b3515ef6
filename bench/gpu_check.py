"""The GPU checklist (the project's GPU.md) as one script, for a session that is lent a GPU.

    python -m bench.gpu_check prepare          # here: the base's config and tokenizer into .gpu/
    bash bench/gpu_check.sh                    # there: installs the carried wheels, runs `check`

`check` runs on whatever device torch sees, so it is tried on CPU before a GPU is spent on
it. The default base's weights (a GGUF of ~100 MB) do not fit the device's transfer limit,
so the base there is SmolLM2-135M's exact architecture and tokenizer with random weights:
right for crashes, syncs, memory and speed, not for what the model says. Each step is
timed, failures are recorded and the next step still runs; everything lands in
<out>/gpu_check.json and the log.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

from adapters.bases import default_cache_dir

REPO = Path(__file__).resolve().parent.parent
PREPARED = REPO / ".gpu"
BASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "special_tokens_map.json", "vocab.json", "merges.txt")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- here: what travels ---------------------------------------------------------------


def prepare(cache_dir: Path) -> None:
    """Copy the converted default base's config and tokenizer (not its weights) into .gpu/base."""
    source = cache_dir / "bases" / "smollm2-135m-instruct"
    if not (source / "config.json").is_file():
        raise SystemExit(f"{source} has no converted base: run `adaptserve prepare-base` first")
    target = PREPARED / "base"
    target.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    log(f"prepared {target}; add /.gpu/ and /.whl/ to .git/info/exclude and carry both")


# --- there: the checks ----------------------------------------------------------------


class Checks:
    def __init__(self, out: Path):
        self.out = out
        self.results: dict[str, Any] = {}

    def run(self, name: str, step: Callable[[], Any]) -> None:
        log(f"== {name}")
        started = time.monotonic()
        try:
            self.results[name] = {"ok": True, "result": step()}
        except Exception as exc:  # one broken step must not hide the others' figures
            self.results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-4000:]}
        self.results[name]["seconds"] = round(time.monotonic() - started, 1)
        log(json.dumps({name: {k: v for k, v in self.results[name].items() if k != "traceback"}}, default=str)[:2000])
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))


def random_base(target: Path) -> Path:
    """SmolLM2-135M's architecture and tokenizer with random weights (saved like a HF folder)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (target / "model.safetensors").is_file():
        return target
    config = AutoConfig.from_pretrained(PREPARED / "base")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    for name in BASE_FILES:
        if (PREPARED / "base" / name).is_file() and not (target / name).exists():
            shutil.copy(PREPARED / "base" / name, target / name)
    return target


def make_adapters(base: Path, store: Path, count: int = 2) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    for i in range(count):
        name = f"gpu-{i}"
        if not (store / name).is_dir():
            torch.manual_seed(100 + i)
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                   LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                              init_lora_weights=False, task_type="CAUSAL_LM"))
            model.save_pretrained(store / name)
        names.append(name)
    return names


def environment() -> dict[str, Any]:
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                    bf16=torch.cuda.is_bf16_supported())
    return info


def server_chat(base: Path, store: Path, adapters: list[str], workdir: Path, quantize: str) -> dict[str, Any]:
    """Item 0: a real server; greedy and temperature-1 chat through the openai client, and both
    at once with an adapter."""
    import httpx
    import openai

    port = 18123
    log_path = workdir / f"server-{quantize}.log"
    command = [sys.executable, "-m", "server.cli", "serve", "--base-model", str(base), "--adapters-dir", str(store),
               "--port", str(port), "--cache-dir", str(workdir / "cache"), "--no-install-example-adapters",
               "--quantize", quantize, "--insecure", "--log-level", "info"]
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]

        def ask(model: str, temperature: float) -> str:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                                   temperature=temperature)
            return reply.choices[0].message.content

        results = {"greedy": ask("", 0.0), "temperature_1": ask("", 1.0)}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(ask, model, t) for model in ("", adapters[0]) for t in (0.0, 1.0) for _ in range(2)]
            results["together"] = [job.result() for job in jobs]
        metrics = httpx.get(url + "/metrics", timeout=10).text
        results["memory_gauges"] = [line for line in metrics.splitlines() if line.startswith("adaptserve_engine_memory")]
        return results
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.copy(log_path, workdir.parent / log_path.name)  # comes back with the results


def parity(base: Path, store: Path, adapters: list[str], workdir: Path, quantize: str, dtype: str) -> dict[str, Any]:
    """Item 2: greedy tokens of a mixed batch (base + 2 adapters) against PEFT on the same base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from adapters.validate import load_adapter_dir
    from server.contract import AdapterBinding, GenerationRequest, SamplingParams
    from server.engine.base import load_base
    from server.engine.engine import TorchEngine

    loaded = load_base(str(base), workdir / "cache", "auto", dtype, quantize)
    engine = TorchEngine(loaded, 8, 2048, 8)
    prompts = ["The capital of France is", "Write a list of three colours:", "def add(a, b):"]
    bindings = [None] + [AdapterBinding(n, p.manifest.version, p.key, p)
                         for n in adapters for p in [load_adapter_dir(store / n, n, engine.signature)]]
    requests = [GenerationRequest(f"r{i}", tuple(engine.tokenize(prompts[i % 3], None)),
                                  SamplingParams(max_new_tokens=16), bindings[i % len(bindings)]) for i in range(6)]
    for request in requests:
        engine.add(request)
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for event in engine.step():
            got.setdefault(event.request_id, []).extend(event.token_ids)
    kwargs: dict[str, Any] = {"dtype": loaded.dtype}
    if quantize != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantize == "nf4", load_in_8bit=quantize == "int8", bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=loaded.dtype, llm_int8_threshold=0.0)
        kwargs["device_map"] = {"": 0}
    agreement = {}
    for i, request in enumerate(requests):
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        if quantize == "none":
            model.to(loaded.device)
        binding = request.adapter
        if binding is not None:
            model = PeftModel.from_pretrained(model, store / binding.name)
        out = model.eval().generate(input_ids=torch.tensor([request.prompt_ids], device=loaded.device),
                                    max_new_tokens=16, do_sample=False)
        expected = out[0, len(request.prompt_ids):].tolist()
        ours = got[request.request_id]
        same = next((k for k, (a, b) in enumerate(zip(ours, expected)) if a != b), min(len(ours), len(expected)))
        agreement[f"{request.request_id}:{binding.name if binding else 'base'}"] = f"{same}/{len(expected)}"
    return {"dtype": str(loaded.dtype), "quantization": loaded.quantization, "agreeing_prefix": agreement}


def memory_and_syncs(base: Path, workdir: Path) -> dict[str, Any]:
    """Items 4 and 5: the base's peak GPU memory per precision; host syncs and kernels per decode step."""
    import torch

    from server.contract import GenerationRequest, SamplingParams
    from server.engine.base import load_base
    from server.engine.engine import TorchEngine

    result: dict[str, Any] = {}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    for quantize, dtype in (("nf4", "bfloat16"), ("none", "bfloat16"), ("int8", "auto")):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loaded = load_base(str(base), workdir / "cache", "cuda", dtype, quantize)
        result[f"peak_bytes_{quantize}"] = torch.cuda.max_memory_allocated() - before
        if quantize == "nf4":
            engine = TorchEngine(loaded, 32, 2048, 32)
            prompt = tuple(engine.tokenize("Write an essay about the history of the printing press.", None))
            for i in range(32):
                sampled = SamplingParams(max_new_tokens=40, temperature=1.0 if i % 2 else 0.0, seed=i)
                engine.add(GenerationRequest(f"s{i}", prompt, sampled))
            for _ in range(4):
                engine.step()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                steps = 5
                started = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                torch.cuda.synchronize()
                elapsed = (time.perf_counter() - started) / steps
                torch.cuda.set_sync_debug_mode("default")
            result["syncs_per_decode_step"] = sum("synchroniz" in str(w.message) for w in caught) / steps
            result["sync_sources"] = sorted({str(w.filename) + ":" + str(w.lineno) for w in caught})[:20]
            result["decode_step_ms_32_rows"] = round(elapsed * 1000, 2)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.step()
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
            result["kernels_per_decode_step"] = len(kernels)
            result["gpu_busy_ms_per_step"] = round(sum(e.device_time for e in kernels) / 1000, 2)
            prof.export_chrome_trace(str(workdir.parent / "decode_step_trace.json"))
            while engine.has_work():
                engine.step()
        del loaded
    return result


def short_bench(base: Path, out: Path) -> dict[str, Any]:
    """Item 3, shortened to fit: scenarios a and b, one 20 s round each."""
    command = [sys.executable, "-m", "bench.run", "--quick", "--scenarios", "a,b", "--measure", "20", "--warmup", "5",
               "--naive-measure", "25", "--base-model", str(base), "--output", str(out / "bench.json")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420)
    return {"returncode": done.returncode, "table": done.stdout[-3000:], "stderr_tail": done.stderr[-1500:]}


def check(out: Path, with_bench: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "work"
    workdir.mkdir(exist_ok=True)
    checks = Checks(out)
    checks.run("environment", environment)
    base = random_base(workdir / "base")
    store = workdir / "store"
    store.mkdir(exist_ok=True)
    adapters = make_adapters(base, store)
    import torch

    quantized = "nf4" if torch.cuda.is_available() else "none"
    checks.run("0_server_chat_" + quantized, lambda: server_chat(base, store, adapters, workdir, quantized))
    for quantize, dtype in ((quantized, "auto"), ("none", "bfloat16" if torch.cuda.is_available() else "float32")):
        checks.run(f"2_parity_{quantize}_{dtype}", lambda q=quantize, d=dtype: parity(base, store, adapters, workdir, q, d))
    checks.run("4_5_memory_syncs", lambda: memory_and_syncs(base, workdir))
    if with_bench:
        checks.run("3_short_bench", lambda: short_bench(base, out))
    shutil.rmtree(workdir / "cache", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="copy the base's config and tokenizer into .gpu/ (run here)")
    prep.add_argument("--cache-dir", type=Path, default=default_cache_dir().parent)
    run = sub.add_parser("check", help="run the checklist on the device torch sees (run there)")
    run.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    run.add_argument("--bench", action="store_true", help="also a shortened `adaptserve bench` (about 4 minutes)")
    options = parser.parse_args(argv)
    if options.command == "prepare":
        prepare(options.cache_dir)
    else:
        check(options.out, options.bench)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
