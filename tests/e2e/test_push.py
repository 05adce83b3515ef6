"""`adaptserve push` against the real server: the three-command workflow's middle step."""

from __future__ import annotations

from server.cli import main as adaptserve
from tests.conftest import make_lora, start_server, stop_server, tiny_settings


def test_push_uploads_and_prints_the_assigned_version(tiny_llama, tmp_path, capsys):
    adapter = make_lora(tiny_llama, tmp_path / "out" / "pushed", r=4, seed=21, weight_scale=3.0)
    running = start_server(tiny_settings(tiny_llama, tmp_path / "store", tmp_path, admin_token="push-token"))
    try:
        assert adaptserve(["push", str(adapter), "--server", running.url, "--token", "wrong"]) == 1
        assert adaptserve(["push", str(adapter), "--server", running.url, "--token", "push-token"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()[-1]
        name, version = printed.split("@")
        with running.client() as client:
            listed = client.get("/v1/adapters/pushed", headers={"Authorization": "Bearer push-token"}).json()
            served = client.post("/v1/generate", json={"prompt": "one two", "adapter": "pushed", "max_new_tokens": 4})
        assert name == "pushed" and version == listed["current"]
        assert served.status_code == 200 and served.json()["adapter"] == {"name": "pushed", "version": version}
    finally:
        stop_server(running)
