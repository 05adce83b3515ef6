"""Basic accessibility in a real browser: every control has a name, and the console works from
the keyboard alone (token entry, tabs with arrow keys, a playground run, version history)."""

from __future__ import annotations

import pytest

from tests.browser.conftest import ADMIN_TOKEN, screenshot
from tests.browser.helpers import GENERATE_TIMEOUT_MS, open_console

pytestmark = pytest.mark.browser

# The accessible name as a screen reader computes it, for the ways this page names controls.
UNNAMED_CONTROLS = """() => {
  const named = (e) => {
    if (e.getAttribute("aria-label")) return true;
    const by = e.getAttribute("aria-labelledby");
    if (by && by.split(" ").some((id) => document.getElementById(id)?.textContent.trim())) return true;
    if (e.labels && [...e.labels].some((l) => l.textContent.trim())) return true;
    return e.tagName === "BUTTON" && e.textContent.trim() !== "";
  };
  return [...document.querySelectorAll("input, select, textarea, button, [role=tab]")]
    .filter((e) => !named(e)).map((e) => e.outerHTML.slice(0, 120));
}"""


def focused(page) -> str:
    return page.evaluate("() => document.activeElement.id || document.activeElement.getAttribute('aria-label') || ''")


def tab_until(page, target: str, limit: int = 40) -> list[str]:
    """Presses Tab until the element with id `target` has focus; returns the focus path."""
    path = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        path.append(focused(page))
        if path[-1] == target:
            return path
    raise AssertionError(f"Tab never reached #{target}: {path}")


def test_every_control_in_every_view_has_a_name(admin_page, console_server):
    open_console(admin_page, console_server)
    admin_page.click("button[aria-label='Version history of gen-a']")
    for view in ["adapters", "playground", "routes", "live"]:
        admin_page.click(f"#tab-{view}")
        assert admin_page.evaluate(UNNAMED_CONTROLS) == [], view
    admin_page.click("#tab-playground")
    admin_page.check("input[name='mode'][value='classify']")
    assert admin_page.evaluate(UNNAMED_CONTROLS) == []
    # Landmarks and the tab pattern a screen reader announces.
    assert admin_page.locator("[role=tablist] [role=tab]").count() == 4
    for tab in admin_page.locator("[role=tab]").all():
        panel = admin_page.locator(f"#{tab.get_attribute('aria-controls')}")
        assert panel.get_attribute("role") == "tabpanel"
        assert panel.get_attribute("aria-labelledby") == tab.get_attribute("id")


def test_the_console_works_from_the_keyboard_alone(page, console_server):
    open_console(page, console_server)
    assert "admin token" in page.inner_text("#adapters-note")

    # Token first: it sits at the top of the tab order.
    tab_until(page, "admin-token")
    page.keyboard.type(ADMIN_TOKEN)
    page.keyboard.press("Enter")
    page.wait_for_selector("tr[data-adapter='gen-a'] .tier")
    assert page.evaluate("() => sessionStorage.getItem('adaptserve.adminToken')") == ADMIN_TOKEN

    # The tablist is one tab stop; arrows, Home and End move between views.
    path = tab_until(page, "tab-adapters")
    assert "tab-playground" not in path
    page.keyboard.press("ArrowRight")
    assert focused(page) == "tab-playground" and page.locator("#view-playground").is_visible()
    page.keyboard.press("End")
    assert focused(page) == "tab-live" and page.locator("#view-live").is_visible()
    page.keyboard.press("Home")
    assert focused(page) == "tab-adapters" and page.locator("#view-adapters").is_visible()
    page.keyboard.press("ArrowLeft")  # wraps around
    assert focused(page) == "tab-live"

    # Version history opens from the keyboard, and focus stays on its button.
    page.keyboard.press("Home")
    tab_until(page, "Version history of gen-b")
    page.keyboard.press("Enter")
    assert page.get_attribute("button[aria-label='Version history of gen-b']", "aria-expanded") == "true"
    assert focused(page) == "Version history of gen-b"
    page.locator("#history-gen-b").wait_for()

    # A playground run: focus the prompt by tabbing, type, Ctrl+Enter.
    page.click("#tab-playground")
    page.fill("#max-new-tokens", "6")  # setup, not under test: keeps the run short
    page.focus("#tab-playground")
    tab_until(page, "prompt")
    page.keyboard.press("Control+a")
    page.keyboard.type("the quick brown")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#columns[data-state='done']", timeout=GENERATE_TIMEOUT_MS)
    assert page.locator(".column").count() == 2  # the base and the first adapter
    # Focus is visible: the focused control draws an outline.
    tab_until(page, "max-new-tokens")
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", "")
    screenshot(page, "keyboard")
