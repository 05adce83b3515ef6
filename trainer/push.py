"""Uploading an adapter folder to a running adaptserve: POST {server}/v1/adapters, multipart."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

from adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, AdapterManifest

TOKEN_ENV = "ADAPTSERVE_ADMIN_TOKEN"


class PushError(RuntimeError):
    pass


def push_adapter(directory: Path, server: str, token: str | None, name: str | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Uploads the two PEFT files (plus manifest.json when present); returns the server's JSON answer."""
    directory = Path(directory)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / f).is_file()]
    if missing:
        raise PushError(f"{directory} is not a servable adapter folder: missing {', '.join(missing)}")
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise PushError(f"an admin token is needed: --token or ${TOKEN_ENV}")
    if name is None:
        manifest_path = directory / MANIFEST_FILE
        name = AdapterManifest.from_dict(_json(manifest_path)).name if manifest_path.is_file() else directory.name
    attached = [f for f in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE) if (directory / f).is_file()]
    handles = {filename: open(directory / filename, "rb") for filename in attached}
    try:
        files = [(filename, (filename, handle, _content_type(filename))) for filename, handle in handles.items()]
        response = httpx.post(
            server.rstrip("/") + "/v1/adapters",
            data={"name": name},
            files=files,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise PushError(f"could not reach {server}: {exc}") from exc
    finally:
        for handle in handles.values():
            handle.close()
    if response.status_code >= 400:
        raise PushError(f"server refused the adapter ({response.status_code}): {error_message(response)}")
    return response.json()


def _content_type(filename: str) -> str:
    return "application/json" if filename.endswith(".json") else "application/octet-stream"


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def error_message(response: httpx.Response) -> str:
    # The server answers errors in OpenAI's shape: {"error": {"message": ...}}.
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    return str(body)[:500]
