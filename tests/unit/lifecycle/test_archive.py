"""Archive uploads unpack only adapter files and refuse every hostile member shape."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from adapters.archive import extract_adapter


def tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def regular(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def test_a_folder_archive_unpacks_the_adapter_files_only(tmp_path):
    archive = tar_gz(tmp_path / "a.tar.gz", [
        (regular("my-adapter/adapter_config.json"), b"{}"),
        (regular("my-adapter/adapter_model.safetensors"), b"weights"),
        (regular("my-adapter/README.md"), b"readme"),
    ])
    out = tmp_path / "out"
    out.mkdir()
    assert extract_adapter(archive, "a.tar.gz", out, 1 << 20) == []
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("member, expected", [
    ((regular("../adapter_config.json"), b"{}"), "'..'"),
    ((regular("a/../../etc/passwd"), b"x"), "'..'"),
    ((regular("/etc/adapter_config.json"), b"{}"), "absolute"),
    ((special("adapter_model.safetensors", tarfile.SYMTYPE, "/etc/passwd"), None), "links"),
    ((special("adapter_config.json", tarfile.LNKTYPE, "x"), None), "links"),
    ((special("dev", tarfile.CHRTYPE), None), "device"),
    ((special("fifo", tarfile.FIFOTYPE), None), "device"),
    ((regular("adapter_model.bin"), b"pickle"), "pickle"),
])
def test_hostile_tar_members_refuse_the_whole_archive(tmp_path, member, expected):
    archive = tar_gz(tmp_path / "a.tgz", [(regular("adapter_config.json"), b"{}"), member])
    out = tmp_path / "out"
    out.mkdir()
    problems = extract_adapter(archive, "a.tgz", out, 1 << 20)
    assert any(expected in p for p in problems), problems
    assert list(out.iterdir()) == []


def test_zip_slip_absolute_and_symlink_are_refused_together(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../../evil.json", "{}")
        zf.writestr("C:/windows/adapter_config.json", "{}")
        link = zipfile.ZipInfo("adapter_model.safetensors")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
    out = tmp_path / "out"
    out.mkdir()
    problems = " | ".join(extract_adapter(path, "a.zip", out, 1 << 20))
    assert "'..'" in problems and "absolute" in problems and "links" in problems
    assert list(out.iterdir()) == []


def test_decompression_bombs_stop_at_the_cap(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", "{}")
        zf.writestr("adapter_model.safetensors", b"\0" * (64 << 20))
    assert path.stat().st_size < 1 << 20
    out = tmp_path / "out"
    out.mkdir()
    (ratio,) = extract_adapter(path, "bomb.zip", out, 1 << 30)
    assert "compression ratio" in ratio
    archive = tar_gz(tmp_path / "big.tar.gz", [(regular("adapter_model.safetensors"), b"\0" * (4 << 20))])
    (cap,) = extract_adapter(archive, "big.tar.gz", out, 1 << 20)
    assert "more than" in cap


def test_garbage_is_reported_not_raised(tmp_path):
    path = tmp_path / "x.tar.gz"
    path.write_bytes(b"not an archive")
    (problem,) = extract_adapter(path, "x.tar.gz", tmp_path, 1 << 20)
    assert "not a readable archive" in problem
