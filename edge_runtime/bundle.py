"""Bundle integrity: the manifest lists every file with its size and SHA-256, and nothing else
may be there. Archives are unpacked only when no member could escape the destination."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

FORMAT_VERSION = 2          # 2: user tower + query encoder graphs (1: one text encoder)
MANIFEST = "manifest.json"


class BundleError(Exception):
    """The bundle is missing, changed, incomplete or unsafe; the message says which file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def verify_bundle(folder: str | Path) -> dict:
    """The manifest, after checking format version and every file; raises BundleError otherwise."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST}; not a fedrec bundle")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise BundleError(f"{manifest_path}: format version {found!r}, this runtime reads {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{manifest_path}: no file list")
    for name, facts in files.items():
        if not safe_name(name):
            raise BundleError(f"{manifest_path}: file name {name!r} escapes the bundle folder")
        path = folder / name
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"{folder}: {name} is missing")
        if path.stat().st_size != facts.get("bytes"):
            raise BundleError(f"{folder}: {name} has {path.stat().st_size} bytes, the manifest says {facts.get('bytes')}")
        if sha256_file(path) != facts.get("sha256"):
            raise BundleError(f"{folder}: {name} does not match its SHA-256 in the manifest (changed or corrupted)")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(files) - {MANIFEST})
    if extra:
        raise BundleError(f"{folder}: files not in the manifest: {', '.join(extra[:5])}")
    return manifest


def open_bundle(path: str | Path, workdir: str | Path | None = None) -> Path:
    """A bundle folder, or a .tar.gz unpacked safely into `workdir` (a new temporary folder by
    default), verified either way; returns the folder."""
    path = Path(path)
    if path.is_dir():
        verify_bundle(path)
        return path
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle")
    target = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedrec-bundle-"))
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = archive.getmembers()
            for member in members:
                if not safe_name(member.name.removeprefix("./")):
                    raise BundleError(f"{path}: archive member {member.name!r} escapes the bundle folder")
                if not (member.isfile() or member.isdir()):
                    raise BundleError(f"{path}: archive member {member.name!r} is a link or device; refused")
            archive.extractall(target, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if workdir is None:
            shutil.rmtree(target, ignore_errors=True)
        raise BundleError(f"{path}: not a readable .tar.gz bundle ({exc})") from exc
    except BundleError:
        if workdir is None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    roots = [p for p in target.iterdir()]
    folder = roots[0] if len(roots) == 1 and roots[0].is_dir() else target
    verify_bundle(folder)
    return folder
