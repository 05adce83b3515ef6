"""Page actions shared by the browser tests."""

from __future__ import annotations

import base64
from pathlib import Path

from tests.browser.conftest import ADMIN_TOKEN

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
GENERATE_TIMEOUT_MS = 60_000


def open_console(page, server, view: str = "adapters") -> None:
    page.goto(f"{server.url}/ui/#{view}")
    page.wait_for_selector("#adapters-table tbody tr", state="attached")


def drop_files(page, selector: str, files: list[Path]) -> None:
    """Drag-and-drop as the browser delivers it: dragover, then drop with a DataTransfer of Files."""
    payload = [{"name": f.name, "b64": base64.b64encode(f.read_bytes()).decode()} for f in files]
    transfer = page.evaluate_handle(
        """files => {
            const transfer = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.b64), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], f.name));
            }
            return transfer;
        }""",
        payload,
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def drop_folder(page, selector: str, folder: Path) -> None:
    """A real OS-level drop of a directory (CDP drag events carry file paths), so the page
    sees a directory entry exactly as when a user drags a folder from a file manager."""
    box = page.locator(selector).bounding_box()
    point = {"x": box["x"] + box["width"] / 2, "y": box["y"] + box["height"] / 2}
    cdp = page.context.new_cdp_session(page)
    data = {"items": [], "files": [str(folder)], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        cdp.send("Input.dispatchDragEvent", {"type": kind, **point, "data": data})
    cdp.detach()


def upload_via_api(server, name: str, folder: Path) -> dict:
    files = [("file", (n, (folder / n).read_bytes())) for n in PEFT_FILES]
    with server.client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        response = http.post("/v1/adapters", data={"name": name}, files=files)
    assert response.status_code in (200, 201), response.text
    return response.json()


def admin_get(server, path: str):
    with server.client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        return http.get(path)


def run_playground(page, *, prompt: str, adapters: list[str], max_new_tokens: int = 12) -> None:
    page.click("#tab-playground")
    page.fill("#prompt", prompt)
    page.fill("#max-new-tokens", str(max_new_tokens))
    page.fill("#temperature", "0")
    for index in range(3):
        page.select_option(f"#pick-{index + 1}", adapters[index] if index < len(adapters) else "")
    page.click("#run")
    page.wait_for_selector("#columns[data-state='done']", timeout=GENERATE_TIMEOUT_MS)
