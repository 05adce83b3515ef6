"""Server settings: one pydantic-settings class, built once in the app factory.

Every field can be set by flag (`adaptserve serve --max-batch-size 16`) or by environment
variable with the ADAPTSERVE_ prefix (`ADAPTSERVE_MAX_BATCH_SIZE=16`), which is what the
Kubernetes manifests use. Nothing here is read at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import DirectoryPath, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaptserve"


def _user_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "adaptserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTSERVE_", extra="forbid")

    # --- where and what -------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the inference API binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the inference API.")
    base_model: str = Field(
        "smollm2-135m-instruct",
        description="Built-in name (smollm2-135m-instruct, minilm-l6), a local HF model "
        "directory, or a hub id (needs network).",
    )
    cache_dir: Path = Field(
        default_factory=_user_cache_dir,
        description="Where converted built-in bases are kept (the GGUF base is converted once).",
    )
    adapters_dir: Path = Field(
        default_factory=lambda: _user_data_dir() / "adapters",
        description="Adapter store (unless adapters_store is set): every PEFT adapter folder in it is registered.",
    )
    adapters_store: str | None = Field(
        None,
        description="Adapter store on S3-compatible object storage, s3://<bucket>[/<prefix>], instead of "
        "adapters_dir: replicas share the bucket, not a filesystem. Endpoint, region and credentials come from "
        "boto3's standard chain (AWS_ENDPOINT_URL for MinIO/Ceph/GCS, AWS_REGION, AWS_ACCESS_KEY_ID, roles).",
    )
    store_cache_dir: Path | None = Field(
        None,
        description="Local disk cache of the versions read from adapters_store (kept across restarts); "
        "None = <cache_dir>/adapter-store/<bucket>/<prefix>.",
    )
    store_cache_bytes: int = Field(
        10 * 1024**3, ge=0,
        description="Byte budget of that disk cache (least recently used versions go first; versions in use stay).",
    )
    install_example_adapters: bool = Field(
        True,
        description="Copy the example adapters shipped with adaptserve into the store at start "
        "when the store lacks them and they fit the base.",
    )

    # --- adapter lifecycle: uploads, cache tiers, replicas ------------------------------
    max_upload_bytes: int = Field(
        256 * 1024 * 1024, ge=1024,
        description="Largest adapter upload (multipart body or archive, and an archive's unpacked files).",
    )
    cpu_cache_bytes: int = Field(
        2 * 1024**3, ge=0,
        description="Host-memory budget for validated adapter tensors (LRU beyond it; pinned stay).",
    )
    device_cache_bytes: int | None = Field(
        None, ge=0,
        description="Budget for adapter bytes resident in device slots (LRU beyond it; pinned stay); "
        "None = only max_device_adapters bounds the slot pool.",
    )
    store_poll_interval_s: float = Field(
        1.0, gt=0, le=60,
        description="How often the adapter store is rescanned (one LIST on object storage when nothing "
        "changed), so replicas sharing it converge.",
    )
    adapter_import_dir: Annotated[list[DirectoryPath], NoDecode] = Field(
        default_factory=list,
        description="Folders (besides adapters_dir) that POST /v1/load_lora_adapter may read a `lora_path` "
        "from; repeat the flag, or separate them with ':' in the environment variable.",
    )

    # --- task routes and merges ----------------------------------------------------------
    routes_file: Path | None = Field(
        None, description="Task routes (YAML/JSON) applied at start; its tasks overwrite the stored routes.",
    )
    max_merge_adapters: int = Field(
        8, ge=1, le=64, description="Adapters per request in `adapters` (a merge or a classify fan-out).",
    )
    max_merge_rank: int = Field(
        128, ge=1, le=4096, description="Largest rank a per-request merge may produce (cat sums the ranks).",
    )
    merge_cache_entries: int = Field(
        16, ge=1, description="Per-request merged adapters kept in host memory (LRU beyond this).",
    )

    # --- security (see SECURITY notes in README) --------------------------------------
    admin_host: str = Field("127.0.0.1", description="Address of the admin listener (with admin_port).")
    admin_port: int | None = Field(
        None, ge=0, le=65535, description="Serve adapter management on its own listener; None = on the main port."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for adapter management; none set = one is generated into "
        "<adapters_dir>/.admin-token (0600) at start.",
    )
    admin_token_file: Path | None = Field(None, description="File holding the admin token (a mounted secret).")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Bearer keys for inference; empty = inference is open."
    )
    api_keys_file: Path | None = Field(None, description="File with one inference key per line (a mounted secret).")
    insecure: bool = Field(
        False, description="No admin token at all: management is open (no generated token, no Host check), "
        "and a non-loopback bind is allowed. Logs a loud warning."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long running requests may finish before exit."
    )

    # --- the base model -------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if available.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU (token-exact with PEFT; bfloat16 on a CPU "
        "with AVX512-BF16/AMX is faster but not exact: README, Precision on CPU)."
    )
    quantize: Literal["auto", "none", "int8", "nf4"] = Field(
        "auto", description="Quantization of the base; auto = nf4 on CUDA, none on CPU. CUDA: bitsandbytes. "
        "CPU: int8 is adaptserve's weight-only int8 (a quarter of the memory), nf4 bitsandbytes' slow fallback."
    )
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores.")

    # --- engine capacity ------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=1024, description="Rows decoded together per step.")
    max_prefill_tokens: int = Field(
        2048, ge=16, description="Prompt tokens admitted per engine step (keeps decoding rows flowing)."
    )
    max_queue: int = Field(256, ge=1, description="Requests waiting beyond this get 429.")
    max_device_adapters: int | None = Field(
        None, ge=1, le=1024, description="Adapter slots in the device pool (LRU beyond this); None = sized "
        "from device_adapter_memory_bytes, and never fewer than max_batch_size (a full batch of distinct "
        "adapters fits); on a vision base, max_batch_size.",
    )
    device_adapter_memory_bytes: int | None = Field(
        None, ge=0, description="Memory the slot pool may grow to, which sizes the default slot count at "
        "r=16 on every linear layer per adapter (pools grow with the slots in use); None = 2 GiB on CPU, "
        "a tenth of the GPU's memory on CUDA.",
    )
    prefix_cache_bytes: int = Field(
        512 * 1024**2, ge=0, description="Automatic prefix caching: KV of prompt prefixes kept per adapter "
        "version for later requests (LRU within this budget, given up under memory pressure); 0 = off.",
    )
    max_lora_rank: int = Field(64, ge=1, le=1024, description="Adapters with a larger r are refused.")
    request_timeout_s: float = Field(300.0, gt=0, description="Deadline per request; past it the row is freed.")

    # --- request caps, checked before any work ----------------------------------------
    max_new_tokens_limit: int = Field(1024, ge=1, description="Largest max_new_tokens a request may ask.")
    default_max_new_tokens: int = Field(64, ge=1, description="max_new_tokens when a request gives none.")
    max_prompt_tokens: int = Field(4096, ge=1, description="Longest prompt accepted (also bounded by the context).")
    max_stop_sequences: int = Field(4, ge=0, description="Stop strings per request.")
    max_stop_length: int = Field(64, ge=1, description="Characters per stop string.")
    max_classify_inputs: int = Field(64, ge=1, description="Texts or images per classify call (x adapters in a fan-out).")
    image_formats: list[Literal["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP"],
        description="Image formats /v1/classify decodes on a vision base; only their decoders see the bytes.",
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest width x height an image may declare; checked on its header, "
        "before any pixel is decoded.",
    )
    max_logprobs: int = Field(
        20, ge=0, le=100, description="Most alternatives per token a request may ask for (completions `logprobs`, "
        "chat `top_logprobs`), as vLLM's --max-logprobs.",
    )
    max_n: int = Field(4, ge=1, le=64, description="Choices per OpenAI request (n x prompts); each is a full row.")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="Largest JSON request body.")

    # --- observability --------------------------------------------------------------
    metrics_adapter_labels: int = Field(
        20, ge=1, le=1000, description="Adapters that keep their own metric label (busiest first); the rest are `other`."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")

    @field_validator("adapters_store")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is not None:
            from adapters.s3_store import parse_s3_url  # boto3 is imported only when an S3 store is used

            parse_s3_url(value)
        return value

    @field_validator("adapter_import_dir", mode="before")
    @classmethod
    def _split_import_dirs(cls, value: object) -> object:
        # An empty item would be Path("") = the working directory: dropped, never allowed.
        items = value.split(os.pathsep) if isinstance(value, str) else value
        return [item for item in items if item != ""] if isinstance(items, list) else items
