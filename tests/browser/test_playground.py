"""Playground in a real browser: each column shows its own model's text (the API's own answer
for the same request), classification bars, field-by-field errors, copyable requests, live metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.browser.conftest import screenshot
from tests.browser.helpers import GENERATE_TIMEOUT_MS, open_console, run_playground

pytestmark = pytest.mark.browser


def column(page, model: str):
    return page.locator(f".column[data-model='{model}']")


def api_answer(server, body: dict) -> str:
    with server.client() as http:
        response = http.post("/v1/generate", json={**body, "stream": False})
    assert response.status_code == 200, response.text
    return response.json()["text"]


def test_side_by_side_columns_each_show_their_own_models_text(page, console_server):
    open_console(page, console_server)
    sent: list[dict] = []
    page.on("request", lambda r: r.url.endswith("/v1/generate") and sent.append(r.post_data_json))
    run_playground(page, prompt="paris is the", adapters=["gen-a", "gen-b"], max_new_tokens=12)

    assert len(sent) == 3 and all(body["stream"] for body in sent)
    texts = {}
    for body in sent:
        model = body.get("adapter", "__base__")
        shown = column(page, model).locator("output").text_content()
        assert shown == api_answer(console_server, body), model
        texts[model] = shown
        stats = column(page, model).locator(".stats").inner_text()
        assert re.search(r"TTFT \d+ ms", stats) and re.search(r"(\d+\.\d|–) tok/s", stats)
        assert re.search(r"\d+ tokens", stats)
    # The adapters change what the model says: three columns, three different texts.
    assert len(set(texts.values())) == 3, texts
    assert column(page, "__base__").locator("h3").inner_text().endswith("(base)")
    screenshot(page, "playground-compare")


def test_classification_shows_a_bar_per_label_with_the_apis_probabilities(page, console_server):
    open_console(page, console_server)
    page.click("#tab-playground")
    page.check("input[name='mode'][value='classify']")
    assert page.locator("#use-base").is_hidden()
    page.fill("#prompt", "i love this product it is great")
    page.select_option("#pick-1", "sentiment")
    page.click("#run")
    page.wait_for_selector("#columns[data-state='done']", timeout=GENERATE_TIMEOUT_MS)

    with console_server.client() as http:
        expected = http.post("/v1/classify", json={"inputs": "i love this product it is great",
                                                  "adapter": "sentiment"}).json()["results"][0]["scores"]
    bars = column(page, "sentiment").locator(".bars li")
    shown = {li.get_attribute("data-label"): float(li.get_attribute("data-score")) for li in bars.all()}
    assert shown == pytest.approx(expected)
    for li in bars.all():
        width = li.locator(".fill").evaluate("e => e.getBoundingClientRect().width")
        track = li.locator(".bar").evaluate("e => e.getBoundingClientRect().width")
        assert width / track == pytest.approx(shown[li.get_attribute("data-label")], abs=0.02)
    screenshot(page, "playground-classify")


def test_invalid_parameters_are_shown_at_their_fields(page, console_server):
    open_console(page, console_server)
    page.click("#tab-playground")
    page.fill("#max-new-tokens", "0")
    page.fill("#temperature", "9")
    page.click("#run")
    page.wait_for_selector("#columns[data-state='done']", timeout=GENERATE_TIMEOUT_MS)

    with console_server.client() as http:
        body = {"messages": [{"role": "user", "content": "x"}], "max_new_tokens": 0, "temperature": 9}
        problems = http.post("/v1/generate", json=body).json()["error"]["details"]
    fields = {p["field"].split(".")[-1]: p["message"] for p in problems}
    assert set(fields) == {"max_new_tokens", "temperature"}
    for field, element in [("max_new_tokens", "max-new-tokens"), ("temperature", "temperature")]:
        assert page.get_attribute(f"#{element}", "aria-invalid") == "true"
        assert page.inner_text(f"#{element}-error") == fields[field]
    assert page.get_attribute("#prompt", "aria-invalid") is None
    assert "see the form above" in column(page, "__base__").inner_text()
    screenshot(page, "playground-invalid")

    # Fixing the fields clears the marks on the next run.
    page.fill("#max-new-tokens", "4")
    page.fill("#temperature", "0")
    page.click("#run")
    page.wait_for_selector("#columns[data-state='done']", timeout=GENERATE_TIMEOUT_MS)
    assert page.get_attribute("#temperature", "aria-invalid") is None
    assert page.locator("#temperature-error").is_hidden()


def test_copy_as_curl_and_openai_show_the_exact_request(page, console_server):
    open_console(page, console_server)
    sent: dict[str, dict] = {}
    page.on("request", lambda r: r.url.endswith("/v1/generate")
            and sent.setdefault(r.post_data_json.get("adapter", "base"), r.post_data_json))
    run_playground(page, prompt="paris is the", adapters=["gen-a"], max_new_tokens=8)
    page.click("#show-request")
    assert page.get_attribute("#show-request", "aria-expanded") == "true"

    curl = page.locator("pre[aria-label='curl — gen-a']").inner_text()
    assert curl.startswith(f"curl -N {console_server.url}/v1/generate")
    quoted = re.search(r"-d '(.*)'$", curl, re.S).group(1).replace("'\\''", "'")
    assert json.loads(quoted) == sent["gen-a"]
    assert "Authorization" not in curl  # no key in this tab, and a key is never pasted into a snippet

    # The openai snippet is a runnable program: it must print the column's text.
    program = page.locator("pre[aria-label='openai — gen-a']").inner_text()
    printed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.rstrip("\n") == column(page, "gen-a").locator("output").text_content()
    screenshot(page, "playground-requests")


def test_live_panel_reads_the_servers_metrics(admin_page, console_server):
    open_console(admin_page, console_server)
    run_playground(admin_page, prompt="one two three", adapters=["gen-a"], max_new_tokens=6)
    admin_page.click("#tab-live")
    live = admin_page.locator("#view-live")
    # The panel refreshes every 2 s (a sample may have caught the run); the first has no rate yet.
    admin_page.wait_for_selector("#view-live dd[data-live='running']:text-is('0')", timeout=10_000)
    admin_page.wait_for_selector("#view-live dd[data-live='tps']:not(:text('–'))", timeout=10_000)
    assert float(live.locator("dd[data-live='tps']").inner_text()) >= 0
    stored = live.locator("dd[data-live='tier-stored']").inner_text()
    assert int(stored.split(" ")[0]) >= 3
    admin_page.click("#tab-adapters")
    admin_page.wait_for_selector("td[data-tokens-for='gen-a']:not(:text-is('0'))", timeout=10_000)
    screenshot(admin_page, "live")


def test_a_server_that_needs_an_api_key_gets_the_one_typed_into_the_page(
        page, tiny_llama, llama_adapters, tmp_path_factory):
    from tests.conftest import start_server, stop_server, tiny_settings

    store = tmp_path_factory.mktemp("keyed-store")
    shutil.copytree(llama_adapters["gen-a"], store / "gen-a")
    server = start_server(tiny_settings(tiny_llama, store, tmp_path_factory.mktemp("keyed"), api_keys=["k-123"]))
    try:
        page.context.route("**/*", lambda route: route.continue_()
                           if route.request.url.startswith(server.url + "/") else route.abort())
        page.goto(server.url + "/ui/#playground")
        # The note is written once the page's first (refused) listing comes back.
        # (A locator wait, not wait_for_function: the page's CSP forbids evaluating strings.)
        page.locator("#adapters-note", has_text="needs an API key").wait_for(state="attached")
        page.fill("#api-key", "k-123")
        page.click("#tokens button[type=submit]")
        page.wait_for_selector("#pick-1 option[value='gen-a']", state="attached")
        run_playground(page, prompt="paris is the", adapters=["gen-a"], max_new_tokens=4)
        assert page.locator(".column[data-state='done']").count() == 2
        page.click("#show-request")
        snippets = page.inner_text("#request-snippets")
        assert "$ADAPTSERVE_API_KEY" in snippets and "k-123" not in snippets
    finally:
        stop_server(server)
