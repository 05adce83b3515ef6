"""The playground on a vision base, in a real browser: the form becomes an image drop, and each
column (the base's own head, then each adapter) shows label bars with the API's probabilities
for the same multipart request."""

from __future__ import annotations

import pytest

from tests.browser.conftest import guarded_tab, screenshot
from tests.browser.helpers import drop_files
from tests.conftest import start_server, stop_server, tiny_settings
from tests.unit.vision.conftest import build_vision_base, image_bytes, make_vision_lora

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def vision_console(browser, tmp_path_factory):
    base = build_vision_base(tmp_path_factory.mktemp("console-vision-base"), "mobilenet_v2")
    store = tmp_path_factory.mktemp("console-vision-store")
    make_vision_lora(base, store / "shapes", "mobilenet_v2", num_labels=3, seed=3, labels=["circle", "square", "star"])
    running = start_server(tiny_settings(base, store, tmp_path_factory.mktemp("console-vision-srv")))
    yield running
    stop_server(running)


@pytest.fixture
def vision_page(browser, vision_console, request):
    with guarded_tab(browser, vision_console.url, request) as tab:
        yield tab


def bars(page, model: str) -> dict[str, float]:
    items = page.locator(f".column[data-model='{model}'] .bars li")
    return {items.nth(i).get_attribute("data-label"): float(items.nth(i).get_attribute("data-score"))
            for i in range(items.count())}


def test_a_dropped_image_gets_label_bars_from_the_base_and_each_adapter(vision_page, vision_console, tmp_path):
    page = vision_page
    page.goto(f"{vision_console.url}/ui/#playground")
    page.wait_for_selector("#image-field:not([hidden])")
    assert page.locator("#mode-generate-label").is_hidden() and page.locator("#prompt-field").is_hidden()

    page.click("#run")  # no image yet: said at the field, nothing sent
    assert page.locator("#image-file-error").is_visible()

    picture = tmp_path / "picture.png"
    picture.write_bytes(image_bytes(21))
    drop_files(page, "#image-drop", [picture])
    page.wait_for_selector("#image-preview:not([hidden])")
    page.select_option("#pick-1", "shapes")
    page.click("#run")
    page.wait_for_selector("#columns[data-state='done']")

    with vision_console.client() as http:
        for model, fields in (("__base__", {}), ("shapes", {"adapter": "shapes"})):
            answer = http.post("/v1/classify", data=fields, files=[("image", ("picture.png", picture.read_bytes()))])
            assert answer.status_code == 200, answer.text
            assert bars(page, model) == pytest.approx(answer.json()["results"][0]["scores"], abs=1e-6), model
    assert list(bars(page, "shapes")) == ["circle", "square", "star"]
    page.click("#show-request")
    assert "-F 'image=@picture.png' -F 'adapter=shapes'" in page.locator("#request-snippets").inner_text()
    screenshot(page, "playground-vision")
