"""Content hashes of a run's inputs, so that a stage's fingerprint changes when a file it reads is edited in
place, not only when an option names another file.

The inputs are the options that name files (``PATH_KEYS``): the initial model (for ``default``, the packaged GGUF
file it is converted from, or its conversion where the package is gone), the data files (``default``: the packaged
ones), ``train.policy``, and ``eval.reward`` (a reward model's folder, or the source file of a ``module:function``'s
module, found on ``sys.path`` without importing it). A dataset named from the local ``datasets`` cache is identified
by its name only; a model named from the local hub cache by the snapshot its name points to. A folder's hash covers
every file in it, by relative path and content.

Hashing reads every byte once; the result is kept per file by (size, modification time) in memory and in the
run folder's ``.selpo/hashes.json`` (only when that folder exists: hashing never creates it), so a rerun
reads again only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

# Options that name files a stage reads.
PATH_KEYS = ("model", "data.train", "data.test", "train.policy", "eval.reward")
CACHE_FILE = Path(".selpo") / "hashes.json"
_CHUNK = 1 << 22

_memory: dict[str, dict] = {}
_loaded: set[str] = set()


def _value(config, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _module_file(spec: str) -> Path | None:
    """The source file of ``module`` in ``module:function``, looked up on the import path without importing."""
    parts = spec.partition(":")[0].split(".")
    for base in ["", *sys.path]:
        root = Path(base or os.getcwd())
        for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
    return None


def input_path(config, key: str) -> Path | None:
    """The local file or folder option ``key`` makes the run read, or None (no file: vader, none, a cached
    dataset's name, an unset ``train.policy``)."""
    from .data import default_data_path
    from .models import DEFAULT_DIRNAME, DEFAULT_MODEL, cache_dir, cached_model_folder, default_gguf_path
    from .rewards import CALLABLE

    value = _value(config, key)
    if value is None:
        return None
    if key == "model" and value == DEFAULT_MODEL:
        try:
            return default_gguf_path()
        except FileNotFoundError:  # the package gone, its conversion kept (a GPU lease carries the folder alone)
            folder = cache_dir() / DEFAULT_DIRNAME
            return folder if (folder / "config.json").is_file() else None
    if key.startswith("data.") and value == "default":
        return Path(default_data_path(key.removeprefix("data.")))
    path = Path(value).expanduser()
    if path.exists():
        return path
    if key == "eval.reward" and CALLABLE.fullmatch(value):
        return _module_file(value)
    if key in ("model", "train.policy"):  # a hub name: its snapshot in the local hub cache
        return cached_model_folder(value)
    return None


def input_paths(config) -> dict[str, Path]:
    """Every option of ``PATH_KEYS`` that names a local file or folder, with it."""
    found = {key: input_path(config, key) for key in PATH_KEYS}
    return {key: path for key, path in found.items() if path is not None}


def content_hash(path: Path, cache_root: Path | None = None) -> str:
    """sha256 (16 hex digits) of a file's bytes, or of a folder's files (relative paths and contents)."""
    _load(cache_root)
    before = len(_memory)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{_file_hash(file)}\n".encode())
        result = digest.hexdigest()[:16]
    else:
        result = _file_hash(path)
    if len(_memory) != before:
        _save(cache_root)
    return result


def _file_hash(path: Path) -> str:
    stat = path.stat()
    key = str(path.resolve())
    known = _memory.get(key)
    if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
        return known["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    _memory[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()[:16]}
    return _memory[key]["sha256"]


def _load(cache_root: Path | None) -> None:
    if cache_root is None or str(cache_root) in _loaded:
        return
    _loaded.add(str(cache_root))
    path = cache_root / CACHE_FILE
    try:
        stored = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else {}
    except (OSError, ValueError):
        stored = {}
    for key, entry in stored.items() if isinstance(stored, dict) else ():
        _memory.setdefault(key, entry)


def _save(cache_root: Path | None) -> None:
    """Writes the cache into an existing ``.selpo`` folder (one temporary file per process, then a rename)."""
    if cache_root is None:
        return
    folder = (cache_root / CACHE_FILE).parent
    if not folder.is_dir() or folder.is_symlink():
        return
    tmp = folder / f".hashes.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(_memory))
        os.replace(tmp, folder / CACHE_FILE.name)
    except OSError:  # a cache: the hash itself is right either way
        tmp.unlink(missing_ok=True)


def input_hashes(config, keys: tuple[str, ...]) -> dict[str, str]:
    """The content hash of every input among ``PATH_KEYS`` covered by ``keys`` (a key itself or its section)."""
    covered = [k for k in PATH_KEYS if k in keys or k.partition(".")[0] in keys]
    root = Path(config.run_dir).expanduser()
    out = {}
    for key in covered:
        path = input_path(config, key)
        if path is not None:
            out[key] = content_hash(path, root)
    return out
