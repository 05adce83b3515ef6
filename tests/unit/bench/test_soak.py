"""`adaptserve soak` guards: loopback only, bounded."""

from __future__ import annotations

import pytest

from bench.soak import is_loopback_url, main


@pytest.mark.parametrize("url, loopback", [
    ("http://127.0.0.1:8000", True), ("http://localhost:8000", True), ("http://[::1]:8000", True),
    ("http://127.0.0.2", True), ("http://10.0.0.1:8000", False), ("http://example.com", False),
    ("http://127.0.0.1.nip.io", False), ("file:///etc/passwd", False),
])
def test_only_loopback_urls_are_soaked(url, loopback):
    assert is_loopback_url(url) is loopback


@pytest.mark.parametrize("argv", [
    ["--url", "http://192.168.1.5:8000"],
    ["--clients", "0"], ["--clients", "10000"], ["--minutes", "0"], ["--minutes", "5000"], ["--max-requests", "0"],
])
def test_refused_runs_send_nothing(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing" in err or "bounds" in err
