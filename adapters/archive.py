"""Unpacking an uploaded `.tar.gz` / `.zip` of a PEFT adapter folder, refusing hostile archives.

Nothing is extracted by the archive libraries themselves: each member is checked, and only
the few adapter files are copied, under names chosen here, with their real bytes counted
(a member's declared size is not trusted). Refused outright, with every reason listed:
absolute paths, `..`, links, devices/FIFOs, more members than an adapter folder has, and
bombs (unpacked bytes past the cap, or an absurd compression ratio). Other regular files
that PEFT writes beside an adapter (README.md...) are skipped.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from adapters.validate import PICKLE_SUFFIXES

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, "config.json")
MAX_MEMBERS = 64
# Safetensors of trained weights barely compress; a huge ratio means a bomb.
MAX_RATIO = 200
CHUNK = 1 << 20
DRIVE = re.compile(r"^[A-Za-z]:")  # a Windows absolute path inside a zip


def is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class _Member:
    name: str
    kind: str  # "file" | "dir" | "link" | "special"
    handle: object  # TarInfo or ZipInfo, opened through the archive it came from
    packed: int | None = None  # compressed size where the format records it (zip)


def _tar_members(tar: tarfile.TarFile) -> list[_Member]:
    members = []
    for info in tar.getmembers():
        if info.isfile():
            kind = "file"
        elif info.isdir():
            kind = "dir"
        elif info.issym() or info.islnk():
            kind = "link"
        else:
            kind = "special"
        members.append(_Member(info.name, kind, info))
    return members


def _zip_members(zf: zipfile.ZipFile) -> list[_Member]:
    members = []
    for info in zf.infolist():
        # Unix file type bits, when a unix zip tool wrote them (0 = unknown = a plain file).
        file_type = stat.S_IFMT(info.external_attr >> 16)
        if file_type == stat.S_IFLNK:
            kind = "link"
        elif info.is_dir():
            kind = "dir"
        elif file_type not in (0, stat.S_IFREG):
            kind = "special"
        else:
            kind = "file"
        members.append(_Member(info.filename, kind, info, info.compress_size))
    return members


def extract_adapter(archive: Path, filename: str, destination: Path, max_bytes: int) -> list[str]:
    """Copy the adapter files of `archive` into `destination`; returns every problem found."""
    try:
        if filename.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                return _extract(_zip_members(zf), zf.open, filename, destination, max_bytes)
        with tarfile.open(archive, "r:gz") as tar:
            return _extract(_tar_members(tar), tar.extractfile, filename, destination, max_bytes)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        return [f"{filename}: not a readable archive ({exc})"]


def _extract(members: list[_Member], open_member, filename: str, destination: Path, max_bytes: int) -> list[str]:
    problems: list[str] = []
    chosen = _choose(members, filename, problems)
    if problems:
        return problems  # nothing written from an archive with any hostile member
    written = 0
    for target, member in chosen.items():
        member_bytes = 0
        with open_member(member.handle) as source, open(destination / target, "wb") as out:
            while chunk := source.read(CHUNK):
                written += len(chunk)
                member_bytes += len(chunk)
                if written > max_bytes:
                    return [f"{filename}: unpacks to more than {max_bytes} bytes"]
                if member.packed is not None and member_bytes > max(1 << 20, MAX_RATIO * member.packed):
                    return [f"{member.name}: compression ratio above {MAX_RATIO}:1 (a decompression bomb?)"]
                out.write(chunk)
    return []


def _choose(members: list[_Member], filename: str, problems: list[str]) -> dict[str, _Member]:
    """Checks every member before any byte is written; returns file name to write -> member."""
    if len(members) > MAX_MEMBERS:
        problems.append(f"{filename}: {len(members)} members; an adapter folder has at most {MAX_MEMBERS}")
        return {}
    chosen: dict[str, _Member] = {}
    for member in members:
        path = PurePosixPath(member.name.replace("\\", "/"))
        if path.is_absolute() or DRIVE.match(member.name):
            problems.append(f"{member.name!r}: absolute paths are refused")
        elif ".." in path.parts:
            problems.append(f"{member.name!r}: '..' in a member path is refused")
        elif member.kind == "link":
            problems.append(f"{member.name!r}: links are refused")
        elif member.kind == "special":
            problems.append(f"{member.name!r}: device, FIFO and other special members are refused")
        elif member.kind == "file" and path.suffix.lower() in PICKLE_SUFFIXES:
            problems.append(f"{member.name}: pickle-based weight files are refused; use safetensors")
        # The adapter folder itself, or one folder holding it (what `tar czf a.tgz my-adapter/` makes).
        elif member.kind == "file" and len(path.parts) <= 2 and path.name in ADAPTER_FILES:
            if path.name in chosen:
                problems.append(f"{member.name}: {path.name} appears more than once")
            chosen[path.name] = member
    return chosen
