"""The baseline adaptserve is measured against: PEFT behind FastAPI, one request at a time.

This is what the usual tutorial becomes as a service: every adapter in a folder loaded into
one PeftModel, and per request `set_adapter` + `generate` under a lock (PEFT's active adapter
is global state, so two requests in flight would run on each other's adapter). Same base and
same /v1/generate request/response shape as adaptserve, so one load generator drives both.
It ignores `stream` and answers with one JSON body; the load generator then counts the
whole latency as time to first token.

    python -m bench.naive_server --port 8100 --adapters-dir /path/to/store
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

logger = logging.getLogger("naive_server")


class GenerateBody(BaseModel):
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None  # through the tokenizer's chat template
    adapter: str | None = None
    max_new_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stream: bool = False  # accepted so the same requests work; never honoured


def load_model(base_model: str, adapters_dir: Path | None):
    """Base + every PEFT adapter folder under `adapters_dir`, as a tutorial would load them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.bases import resolve_base

    path = resolve_base(base_model).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    folders = sorted(p for p in adapters_dir.iterdir() if (p / "adapter_config.json").is_file()) if adapters_dir else []
    if folders:
        model = PeftModel.from_pretrained(model, folders[0], adapter_name=folders[0].name)
        for folder in folders[1:]:
            model.load_adapter(folder, adapter_name=folder.name)
    model.eval()
    logger.info("naive server: %s with %d adapters", path, len(folders))
    return model, tokenizer, {p.name for p in folders}


class _StopWhenSet:
    """A StoppingCriteria: ends generate() once the client is gone (checked between tokens)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def create_app(model, tokenizer, adapter_names: set[str]) -> FastAPI:
    app = FastAPI(title="naive PEFT server")
    lock = asyncio.Lock()

    def generate_one(body: GenerateBody, gone: threading.Event) -> dict:
        if body.adapter is not None:
            model.set_adapter(body.adapter)
            adapter_scope = contextlib.nullcontext()
        else:
            adapter_scope = model.disable_adapter() if adapter_names else contextlib.nullcontext()
        if body.messages is not None:
            text = tokenizer.apply_chat_template(body.messages, tokenize=False, add_generation_prompt=True)
            encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            encoded = tokenizer(body.prompt or "", return_tensors="pt")
        sampling = {"do_sample": False}
        if body.temperature > 0:
            if body.seed is not None:
                torch.manual_seed(body.seed)
            sampling = {"do_sample": True, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k}
        with adapter_scope, torch.inference_mode():
            output = model.generate(
                **encoded, max_new_tokens=body.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                stopping_criteria=[_StopWhenSet(gone)], **sampling,
            )
        new_ids = output[0, encoded["input_ids"].shape[1] :].tolist()
        stopped = bool(new_ids) and new_ids[-1] == tokenizer.eos_token_id
        return {
            "text": tokenizer.decode(new_ids, skip_special_tokens=True),
            "finish_reason": "stop" if stopped else "length",
            "usage": {"prompt_tokens": int(encoded["input_ids"].shape[1]), "completion_tokens": len(new_ids)},
        }

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request):
        if body.adapter is not None and body.adapter not in adapter_names:
            raise HTTPException(404, f"adapter {body.adapter!r} is not loaded")
        async with lock:
            # A client that gave up gets no (more) generation: otherwise the queue a benchmark
            # round abandons would keep the CPU busy into the next round.
            if await request.is_disconnected():
                return JSONResponse({"detail": "client disconnected"}, status_code=499)
            gone = threading.Event()
            watcher = asyncio.create_task(_watch_disconnect(request, gone))
            try:
                # Off the event loop so /readyz and new connections still answer while it runs.
                return await asyncio.to_thread(generate_one, body, gone)
            finally:
                watcher.cancel()

    return app


async def _watch_disconnect(request: Request, gone: threading.Event) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    gone.set()


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--adapters-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = all cores")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(*load_model(args.base_model, args.adapters_dir))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
