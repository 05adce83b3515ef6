"""Real-browser fixtures: Debian's chromium driven by playwright against a live server.

`playwright install` is never used (its browser downloads need the network); the system
chromium is launched through `executable_path`. Without it the browser tests skip, except
under CI, where a missing browser is a failure: the console must be tested there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import start_server, stop_server, tiny_settings

CHROMIUM = Path(os.environ.get("ADAPTSERVE_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
ADMIN_TOKEN = "console-admin-token"
# Flags that keep a headless chromium from phoning home or needing a sandbox in containers.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
]


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; never `playwright install`)"
    return None


# Package scope, not session: playwright's sync API keeps an event loop running in the main
# thread while it is open, which would break asyncio.run() in every test collected after these.
@pytest.fixture(scope="package")
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="package")
def console_server(browser, tiny_llama, llama_adapters, tmp_path_factory):
    """A server on the tiny Llama with an admin token and gen-a, gen-b and sentiment stored."""
    store = tmp_path_factory.mktemp("console-store")
    for name, folder in llama_adapters.items():
        shutil.copytree(folder, store / name)
    settings = tiny_settings(tiny_llama, store, tmp_path_factory.mktemp("console-srv"), admin_token=ADMIN_TOKEN)
    running = start_server(settings)
    yield running
    stop_server(running)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.when == "call":
        item.browser_failed = report.failed  # read by `guarded_tab` to keep a screenshot of the failure
    return report


@contextlib.contextmanager
def guarded_tab(browser, origin: str, request) -> Iterator:
    """A fresh tab that may reach `origin` and nothing else.

    Every request for another origin is aborted and recorded; so is every console error and
    uncaught exception. The test fails on any of them when the tab closes.
    """
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    blocked: list[str] = []
    problems: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith(origin + "/"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_server)
    tab = context.new_page()
    tab.on("console", lambda message: message.type == "error" and problems.append(message.text))
    tab.on("pageerror", lambda error: problems.append(str(error)))
    yield tab
    if getattr(request.node, "browser_failed", False):
        screenshot(tab, f"FAILED-{request.node.name}")
    context.close()
    assert not blocked, f"the console tried to reach the network: {blocked}"
    # A failed fetch the test provoked on purpose (a 4xx) logs "Failed to load resource".
    assert not [p for p in problems if "Failed to load resource" not in p], problems


@pytest.fixture
def page(browser, console_server, request):
    with guarded_tab(browser, console_server.url, request) as tab:
        yield tab


@pytest.fixture
def admin_page(page):
    """A tab that holds the admin token, as if the user had entered it once."""
    page.add_init_script(f"sessionStorage.setItem('adaptserve.adminToken', {ADMIN_TOKEN!r})")
    return page


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
