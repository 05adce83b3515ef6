"""Adapters view in a real browser: listing, uploads by drag and drop and file input,
validation errors field by field, version history with rollback and delete."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from tests.browser.conftest import screenshot
from tests.browser.helpers import PEFT_FILES, admin_get, drop_files, drop_folder, open_console, upload_via_api
from tests.conftest import make_lora

pytestmark = pytest.mark.browser


def row(page, name: str):
    return page.locator(f"tr[data-adapter='{name}']")


def test_every_adapter_is_listed_as_the_api_lists_it(admin_page, console_server):
    open_console(admin_page, console_server)
    listed = admin_get(console_server, "/v1/adapters").json()["adapters"]
    assert {a["name"] for a in listed} >= {"gen-a", "gen-b", "sentiment"}
    for adapter in listed:
        cells = row(admin_page, adapter["name"]).locator("td").all_inner_texts()
        task, current, versions, tier, pinned = cells[:5]
        assert current == adapter["current"] and versions == str(len(adapter["versions"]))
        assert tier == adapter["status"] and pinned == ("yes" if adapter["pinned"] else "no")
        assert task == adapter["versions"][0]["task"]
    assert "negative, neutral, positive" in row(admin_page, "sentiment").inner_text()
    screenshot(admin_page, "adapters")


def test_without_the_admin_token_the_public_list_shows_and_the_page_says_why(page, console_server):
    open_console(page, console_server)
    assert row(page, "gen-a").is_visible()
    assert "admin token" in page.inner_text("#adapters-note")


def test_upload_by_dropping_the_two_peft_files(admin_page, console_server, tiny_llama, tmp_path):
    folder = make_lora(tiny_llama, tmp_path / "dropped", seed=21)
    open_console(admin_page, console_server)
    drop_files(admin_page, "#dropzone", [folder / n for n in PEFT_FILES])
    assert admin_page.locator("#upload-files-list li").count() == 2
    admin_page.fill("#upload-name", "dropped")
    admin_page.click("#upload-submit")
    row(admin_page, "dropped").wait_for()
    stored = admin_get(console_server, "/v1/adapters/dropped").json()
    assert f"dropped@{stored['current']}" in admin_page.inner_text("#upload-status")
    assert row(admin_page, "dropped").locator("td").nth(1).inner_text() == stored["current"]
    screenshot(admin_page, "upload-dropped")


def test_upload_by_dropping_a_peft_folder(admin_page, console_server, tiny_llama, tmp_path):
    folder = make_lora(tiny_llama, tmp_path / "from-folder", seed=23)
    (folder / "training_args.bin").write_bytes(b"a pickle the page must not send")
    open_console(admin_page, console_server)
    drop_folder(admin_page, "#dropzone", folder)
    admin_page.locator("#upload-files-list li").first.wait_for()
    # The folder names the adapter; only the files the server accepts are sent.
    assert admin_page.input_value("#upload-name") == "from-folder"
    listed = admin_page.inner_text("#upload-files-list")
    assert "adapter_config.json" in listed and "adapter_model.safetensors" in listed
    assert "left out: " in listed and "training_args.bin" in listed and "README.md" in listed
    admin_page.click("#upload-submit")
    row(admin_page, "from-folder").wait_for()
    assert admin_get(console_server, "/v1/adapters/from-folder").status_code == 200


def test_upload_an_archive_through_the_file_input(admin_page, console_server, tiny_llama, tmp_path):
    folder = make_lora(tiny_llama, tmp_path / "archived", seed=22)
    archive = tmp_path / "archived.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in PEFT_FILES:
            tar.add(folder / name, arcname=f"archived/{name}")
    open_console(admin_page, console_server)
    admin_page.set_input_files("#upload-files", str(archive))
    # The name comes from the archive's; the user may still change it.
    assert admin_page.input_value("#upload-name") == "archived"
    admin_page.click("#upload-submit")
    row(admin_page, "archived").wait_for()
    assert admin_get(console_server, "/v1/adapters/archived").status_code == 200


def test_a_refused_upload_shows_every_problem_where_it_belongs(admin_page, console_server, llama_adapters, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapters["gen-a"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config.update(r=0, auto_map={"AutoModel": "evil.Model"})
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with console_server.client(headers={"Authorization": "Bearer console-admin-token"}) as http:
        expected = http.post("/v1/adapters", data={"name": "Bad/Name"},
                             files=[("file", (n, (bad / n).read_bytes())) for n in PEFT_FILES]).json()
    problems = expected["error"]["details"]

    open_console(admin_page, console_server)
    drop_files(admin_page, "#dropzone", [bad / n for n in PEFT_FILES])
    admin_page.fill("#upload-name", "Bad/Name")
    admin_page.click("#upload-submit")
    admin_page.wait_for_selector("#upload-files-error li")

    name_error = admin_page.locator("#upload-name-error")
    assert admin_page.get_attribute("#upload-name", "aria-invalid") == "true" and name_error.is_visible()
    assert "name" in name_error.inner_text()
    assert admin_page.get_attribute("#upload-files", "aria-invalid") == "true"
    shown = admin_page.locator("#upload-files-error li").evaluate_all("items => items.map(i => i.dataset.problem)")
    name_problems = [p for p in problems if p.startswith("name ")]
    assert name_problems and sorted(shown) == sorted(p for p in problems if p not in name_problems)
    assert any("r=0" in p for p in shown) and any("auto_map" in p for p in shown)
    assert "422" in admin_page.inner_text("#upload-status")
    assert row(admin_page, "bad-name").count() == 0
    screenshot(admin_page, "upload-refused")


def test_history_rolls_back_and_deletes_only_after_confirmation(admin_page, console_server, tiny_llama, tmp_path):
    from playwright.sync_api import expect  # here, so collection works where playwright is absent

    first = upload_via_api(console_server, "hist", make_lora(tiny_llama, tmp_path / "v1", seed=31))
    second = upload_via_api(console_server, "hist", make_lora(tiny_llama, tmp_path / "v2", seed=32))
    open_console(admin_page, console_server)
    admin_page.click("button[aria-label='Version history of hist']")
    history = admin_page.locator("#history-hist")
    assert history.locator("tr[data-version]").count() == 2

    dialogs: list[str] = []

    def answer(accept: bool):
        def handle(dialog):
            dialogs.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()
        admin_page.once("dialog", handle)

    answer(False)
    history.locator(f"button[aria-label='Make hist@{first['version']} current']").click()
    admin_page.wait_for_timeout(300)
    assert admin_get(console_server, "/v1/adapters/hist").json()["current"] == second["version"]

    answer(True)
    history.locator(f"button[aria-label='Make hist@{first['version']} current']").click()
    expect(row(admin_page, "hist").locator("td").nth(1)).to_have_text(first["version"])
    assert admin_get(console_server, "/v1/adapters/hist").json()["current"] == first["version"]
    screenshot(admin_page, "history")

    answer(True)
    admin_page.locator(f"button[aria-label='Delete hist@{second['version']}']").click()
    admin_page.locator(f"#history-hist tr[data-version='{second['version']}']").wait_for(state="detached")
    assert [v["version"] for v in admin_get(console_server, "/v1/adapters/hist").json()["versions"]] == [first["version"]]

    answer(True)
    admin_page.click("button[aria-label='Delete hist (every version)']")
    row(admin_page, "hist").wait_for(state="detached")
    assert admin_get(console_server, "/v1/adapters/hist").status_code == 404
    assert len(dialogs) == 4 and all("hist" in d for d in dialogs)


def test_routes_view_shows_each_tasks_targets_weights_and_what_they_resolve_to(admin_page, console_server):
    route = {"targets": [{"adapter": "gen-a", "weight": 90}, {"adapter": "not-yet", "weight": 10}], "fallback": "base"}
    with console_server.client(headers={"Authorization": "Bearer console-admin-token"}) as http:
        assert http.put("/v1/routes/chat", json=route).status_code == 200
        current = http.get("/v1/adapters/gen-a").json()["current"]
    open_console(admin_page, console_server, view="routes")
    section = admin_page.locator("section[aria-label='Route chat']")
    section.wait_for()
    gen_a, missing = section.locator("li[data-target='gen-a']"), section.locator("li[data-target='not-yet']")
    assert "90" in gen_a.inner_text() and f"gen-a@{current}" in gen_a.inner_text()
    assert "not registered" in missing.inner_text()
    assert "fallback: base" in section.inner_text()
    screenshot(admin_page, "routes")


def test_pin_and_unpin_from_the_list(admin_page, console_server):
    open_console(admin_page, console_server)
    admin_page.click("button[aria-label='Pin gen-b']")
    admin_page.locator("button[aria-label='Unpin gen-b']").wait_for()
    assert row(admin_page, "gen-b").locator("td").nth(4).inner_text() == "yes"
    assert admin_get(console_server, "/v1/adapters/gen-b").json()["pinned"] is True
    admin_page.click("button[aria-label='Unpin gen-b']")
    admin_page.locator("button[aria-label='Pin gen-b']").wait_for()
    assert admin_get(console_server, "/v1/adapters/gen-b").json()["pinned"] is False
