"""Bundle integrity. A bundle is a folder of files that manifest.json lists with their size and
SHA-256, plus manifest.sha256: the SHA-256 of manifest.json's exact bytes, in `sha256sum` format
(`sha256sum -c manifest.sha256` checks it too). Nothing else may be there.

`verify_bundle` reads the format version first (it decides the layout), then checks the
manifest's digest before using anything in it, parses it into a typed `BundleManifest` (every
path it names must be a file it lists, so nothing outside the bundle or unverified is ever
opened), then checks every file. This proves integrity against corruption, truncation and casual
edits, not authenticity: whoever can rewrite a bundle can recompute every digest, and then only
the path rule still holds. Archives are unpacked only when no member could escape the destination.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fedrec.edge_runtime.fusion import Fusion
from fedrec.edge_runtime.lexical import LexicalFiles

FORMAT_VERSION = 4          # 4: BM25 lexical index and fusion (3: manifest.sha256, 2: user tower + query
                            # encoder graphs, 1: one text encoder)
MANIFEST = "manifest.json"
DIGEST = "manifest.sha256"


class BundleError(Exception):
    """The bundle is missing, changed, incomplete or unsafe; the message says which file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_line(manifest: bytes) -> bytes:
    """The content of manifest.sha256 for these manifest bytes."""
    return f"{hashlib.sha256(manifest).hexdigest()}  {MANIFEST}\n".encode()


def safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


TYPE_NAMES = {int: "a whole number ≥ 0", float: "a number", str: "a string", dict: "an object"}


class Section:
    """One JSON object of the manifest: each read checks a key's presence and type, and an error
    names the file and the key."""

    def __init__(self, value: dict, key: str, label: str):
        self.value, self.key, self.label = value, key, label

    def name(self, key: str) -> str:
        return f"{self.key}.{key}" if self.key else key

    def get(self, key: str, kind: type, required: bool = True):
        if key not in self.value:
            if required:
                raise BundleError(f"{self.label}: {self.name(key)} is missing")
            return None
        value = self.value[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or kind is int and (isinstance(value, bool) or value < 0):
            raise BundleError(f"{self.label}: {self.name(key)} must be {TYPE_NAMES[kind]}, got {value!r:.80}")
        return value

    def section(self, key: str) -> Section:
        return Section(self.get(key, dict), self.name(key), self.label)

    def file(self, key: str, files: dict, required: bool = True) -> str | None:
        """A path the manifest names: only a file it lists (hence a safe name, and verified)."""
        name = self.get(key, str, required)
        if name is not None and name not in files:
            raise BundleError(f"{self.label}: {self.name(key)} must be a file of this bundle, got {name!r}")
        return name


@dataclass(frozen=True)
class FileFacts:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelFacts:
    """The manifest's `model` section; every file name in it is a listed file of the bundle."""
    kind: str
    dim: int
    text_dim: int
    history_items: int
    max_age: int
    max_query_tokens: int
    items_count: int
    parameters: dict
    onnx: dict[str, dict[str, str]]         # graph (user_tower, query_encoder) → precision → file
    tokenizer: str
    item_matrix: str
    items: str
    lexical: LexicalFiles                   # the BM25 index over the titles (edge_runtime.lexical)
    fusion: Fusion                          # how hybrid search combines it with the model's scores
    tensorrt_engine: str | None = None
    item_index: str | None = None

    @classmethod
    def parse(cls, model: Section, files: dict) -> ModelFacts:
        onnx = model.section("onnx")
        graphs = {}
        for graph in ("user_tower", "query_encoder"):
            precisions = onnx.section(graph)
            precisions.get("fp32", str)     # every bundle has it; the user tower falls back to it
            graphs[graph] = {precision: precisions.file(precision, files) for precision in precisions.value}
        lexical, fusion = model.section("lexical"), model.section("fusion")
        try:
            fused = Fusion(fusion.get("method", str), fusion.get("parameter", float))
        except ValueError as exc:
            raise BundleError(f"{model.label}: {fusion.key}: {exc}") from None
        return cls(kind=model.get("kind", str),
                   dim=model.get("dim", int),
                   text_dim=model.get("text_dim", int),
                   history_items=model.get("history_items", int),
                   max_age=model.get("max_age", int),
                   max_query_tokens=model.get("max_query_tokens", int),
                   items_count=model.get("items_count", int),
                   parameters=model.get("parameters", dict),
                   onnx=graphs,
                   tokenizer=model.file("tokenizer", files),
                   item_matrix=model.file("item_matrix", files),
                   items=model.file("items", files),
                   lexical=LexicalFiles(**{name: lexical.file(name, files) for name in LexicalFiles.__dataclass_fields__}),
                   fusion=fused,
                   tensorrt_engine=model.file("tensorrt_engine", files, required=False),
                   item_index=model.file("item_index", files, required=False))


@dataclass(frozen=True)
class BundleManifest:
    """manifest.json, checked for structure and types."""
    format_version: int
    fedrec_version: str
    source: str                             # the checkpoint's folder name, not a path
    model: ModelFacts
    metrics: dict
    privacy: dict
    files: dict[str, FileFacts]
    document: dict = field(repr=False)      # the JSON as read (the server's /health reports from it)

    @classmethod
    def parse(cls, document: object, label: str = MANIFEST) -> BundleManifest:
        if not isinstance(document, dict):
            raise BundleError(f"{label}: not a JSON object")
        top = Section(document, "", label)
        listed = top.section("files")
        files = {}
        for name in listed.value:
            if not safe_name(name):
                raise BundleError(f"{label}: file name {name!r} escapes the bundle folder")
            facts = listed.section(name)
            files[name] = FileFacts(facts.get("sha256", str), facts.get("bytes", int))
        source = top.get("source", str)
        if "/" in source or "\\" in source:
            raise BundleError(f"{label}: source must be a checkpoint's name, got {source!r}")
        privacy = top.section("privacy")
        privacy.get("regions", dict)        # what `fedrec audit` checks
        privacy.get("statement", str)
        return cls(format_version=top.get("format_version", int),
                   fedrec_version=top.get("fedrec_version", str),
                   source=source,
                   model=ModelFacts.parse(top.section("model"), files),
                   metrics=top.get("metrics", dict),
                   privacy=privacy.value,
                   files=files,
                   document=document)


def verify_bundle(folder: str | Path) -> BundleManifest:
    """The manifest, after checking format version, its digest, its schema and every file;
    raises BundleError otherwise."""
    folder = Path(folder)
    manifest_path, digest_path = folder / MANIFEST, folder / DIGEST
    if not regular_file(manifest_path):
        raise BundleError(f"{folder}: no {MANIFEST}; not a fedrec bundle")
    data = manifest_path.read_bytes()
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc
    found = document.get("format_version") if isinstance(document, dict) else None
    if found != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: format version {found!r}, this runtime reads {FORMAT_VERSION}; "
                          "export the bundle again with this fedrec")
    if not regular_file(digest_path):
        raise BundleError(f"{folder}: {DIGEST} is missing")
    if digest_path.read_bytes() != digest_line(data):
        raise BundleError(f"{manifest_path} does not match its SHA-256 in {DIGEST} (changed or corrupted)")
    manifest = BundleManifest.parse(document, str(manifest_path))
    for name, facts in manifest.files.items():
        path = folder / name
        if not regular_file(path):
            raise BundleError(f"{folder}: {name} is missing")
        if path.stat().st_size != facts.bytes:
            raise BundleError(f"{folder}: {name} has {path.stat().st_size} bytes, the manifest says {facts.bytes}")
        if sha256_file(path) != facts.sha256:
            raise BundleError(f"{folder}: {name} does not match its SHA-256 in the manifest (changed or corrupted)")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(manifest.files) - {MANIFEST, DIGEST})
    if extra:
        raise BundleError(f"{folder}: files not in the manifest: {', '.join(extra[:5])}")
    return manifest


MAX_MEMBERS = 256                   # a bundle has about ten files
MAX_MANIFEST_BYTES = 1 << 20


def archive_members(archive: tarfile.TarFile, path: Path) -> list[tarfile.TarInfo]:
    """The archive's members, checked from their headers before anything is written: safe names,
    regular files and folders only, and every file one that its manifest lists, at the size it
    lists, so that unpacking writes no more than the manifest declares."""
    members = []
    for member in archive:                          # headers only: member data is skipped, not kept
        if len(members) == MAX_MEMBERS:
            raise BundleError(f"{path}: more than {MAX_MEMBERS} archive members; not a fedrec bundle")
        if not safe_name(member.name.removeprefix("./")):
            raise BundleError(f"{path}: archive member {member.name!r} escapes the bundle folder")
        if not (member.isfile() or member.isdir()):
            raise BundleError(f"{path}: archive member {member.name!r} is a link or device; refused")
        members.append(member)
    names = [PurePosixPath(m.name.removeprefix("./")) for m in members]
    manifests = [(name.parent, member) for name, member in zip(names, members)
                 if name.name == MANIFEST and len(name.parts) <= 2 and member.isfile()]
    if len(manifests) != 1:
        raise BundleError(f"{path}: no single {MANIFEST} in the archive; not a fedrec bundle")
    root, manifest = manifests[0]
    if manifest.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: its {MANIFEST} has {manifest.size} bytes, over {MAX_MANIFEST_BYTES}; refused")
    try:
        listed = json.loads(archive.extractfile(manifest).read())["files"]
        sizes = {name: facts.get("bytes") for name, facts in listed.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise BundleError(f"{path}: its {MANIFEST} lists no files with their sizes; not a fedrec bundle") from None
    sizes |= {MANIFEST: manifest.size, DIGEST: len(digest_line(b""))}
    for name, member in zip(names, members):          # each one: a name twice is written twice
        inside = name.relative_to(root).as_posix() if name.is_relative_to(root) else None
        if member.isdir():                          # no bytes; the export's marker is a folder
            continue
        if inside not in sizes:
            raise BundleError(f"{path}: archive member {member.name!r} is not in the bundle's manifest")
        if member.size != sizes[inside]:
            raise BundleError(f"{path}: archive member {member.name!r} has {member.size} bytes, "
                              f"the manifest says {sizes[inside]}")
    return members


def open_bundle(path: str | Path, workdir: str | Path | None = None) -> tuple[Path, BundleManifest]:
    """A bundle folder, or a .tar.gz unpacked safely into `workdir` (by default a new temporary
    folder, the caller's to remove: EdgeModel passes its own, removed once loaded), verified
    either way; returns the folder and its manifest. Nothing the manifest does not list is
    written (`archive_members`), and a refused archive leaves no temporary folder."""
    path = Path(path)
    if path.is_dir():
        return path, verify_bundle(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle")
    target = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedrec-bundle-"))
    try:
        try:
            with tarfile.open(path, "r:gz") as archive:
                archive.extractall(target, members=archive_members(archive, path), filter="data")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise BundleError(f"{path}: not a readable .tar.gz bundle ({exc})") from exc
        roots = list(target.iterdir())
        folder = roots[0] if len(roots) == 1 and roots[0].is_dir() else target
        return folder, verify_bundle(folder)
    except BaseException:
        if workdir is None:
            shutil.rmtree(target, ignore_errors=True)
        raise
