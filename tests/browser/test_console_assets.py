"""The console's assets as served, without a browser: packaged, allowlisted, offline by policy."""

from __future__ import annotations

import re
from importlib.resources import files

from fastapi.testclient import TestClient

from server.api.ui import ASSETS
from server.app import create_app
from server.config import Settings


def client(tmp_path) -> TestClient:
    # No `with`: the lifespan (and so the base model) never starts; the console needs neither.
    # localhost: the zero-config server answers loopback Host names only (TestClient says "testserver").
    return TestClient(create_app(Settings(adapters_dir=tmp_path / "a", cache_dir=tmp_path / "c")), base_url="http://localhost")


def test_every_asset_ships_inside_the_package():
    packaged = files("server.ui")
    for name in ASSETS:
        assert packaged.joinpath(name).is_file(), name


def test_assets_are_served_with_a_same_origin_policy(tmp_path):
    http = client(tmp_path)
    root = http.get("/ui", follow_redirects=False)
    assert root.status_code == 308 and root.headers["location"] == "/ui/"
    for path, kind in [("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")]:
        response = http.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        policy = response.headers["content-security-policy"]
        assert "connect-src 'self'" in policy and "script-src 'self'" in policy and "default-src 'none'" in policy


def test_only_the_three_assets_are_reachable(tmp_path):
    http = client(tmp_path)
    for path in ["/ui/__init__.py", "/ui/..%2fapi%2fui.py", "/ui/../app.py", "/ui/missing.js"]:
        assert http.get(path).status_code == 404, path


def test_admin_only_surface_serves_no_console(tmp_path):
    app = create_app(Settings(adapters_dir=tmp_path / "a", cache_dir=tmp_path / "c"), surface="admin")
    assert TestClient(app, base_url="http://localhost").get("/ui/").status_code == 404


def test_assets_reference_no_other_origin():
    for name in ASSETS:
        text = files("server.ui").joinpath(name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        # Inline scripts, styles and handlers would need a weaker CSP.
        if name == "index.html":
            assert not re.search(r"<script>|<style|\son[a-z]+=|style=", text)
