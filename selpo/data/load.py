"""Reading preference data from local files through the ``datasets`` library (never from a hub)."""

from __future__ import annotations

import codecs
import functools
import json
import os
import re
from importlib import resources
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# JSON's whitespace: a line of nothing else holds no row (``datasets`` skips it).
JSON_SPACE = b" \t\r\n"
# JSON's name of each kind of value (bool first: a Python bool is an int).
JSON_KINDS = ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"), (list, "an array"),
              (dict, "an object"))
# A dataset name as the hub spells it (owner/name or name), optionally with ":split".
CACHED_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?")
DEFAULT_SPLITS = ("train", "test")


def default_data_path(split: str) -> str:
    """The shipped default dataset (controlled-sentiment reviews, see ``selpo.sentiment``): "train" or "test"."""
    if split not in DEFAULT_SPLITS:
        raise ValueError(f"split must be one of {DEFAULT_SPLITS}, got {split!r}")
    return str(resources.files("selpo") / "default_data" / f"{split}.jsonl")


def load_preference_dataset(path: str | os.PathLike, *, split: str | None = None):
    """A ``datasets.Dataset`` of preference rows from a local file or folder, or a dataset in the local cache.

    Files: JSON Lines (``.jsonl``), JSON (``.json``: an array of rows) or Parquet (``.parquet``). A folder
    is a dataset saved with ``save_to_disk``; a saved ``DatasetDict`` needs ``split`` unless it holds one
    split. Anything else that looks like a dataset name (``owner/name``, optionally ``:split``) is read from
    the ``datasets`` cache, offline (``load_cached``). Rows are not checked here: ``tokenize_pairs``
    validates every row (see ``selpo.data.pairs``); but a source with no row at all is an error naming it, and
    so is a JSON file that is not UTF-8 (``check_utf8``), or that ``datasets`` cannot read because a line is not
    JSON, a row no object or a column changes type (``check_json_rows`` names the line).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or folder path, got {type(path).__name__}")
    dataset = _load(path, split)
    if len(dataset) == 0:
        raise _no_rows(path)
    return dataset


def _no_rows(path) -> ValueError:
    return ValueError(f"{path}: holds no rows of preference data")


def _load(path: str | os.PathLike, split: str | None):
    import datasets

    p = Path(path).expanduser()
    if not p.exists():
        if is_cached_name(str(path)):
            name, _, named_split = str(path).partition(":")
            return load_cached(name, named_split or split or "train")
        raise FileNotFoundError(f"path: no such file or folder: {str(path)!r}")
    if p.is_dir():
        try:
            loaded = datasets.load_from_disk(str(p))
        except FileNotFoundError as e:
            raise ValueError(f"path: {str(path)!r} is a folder but not a dataset saved with save_to_disk "
                             f"({e})") from None
        return _pick_split(loaded, split, path)
    builder = FORMATS.get(p.suffix.lower())
    if builder is None:
        raise ValueError(f"path: {str(path)!r} has an unsupported suffix; expected one of {sorted(FORMATS)} "
                         "or a folder")
    if split is not None:
        raise ValueError(f"split applies only to a saved DatasetDict folder, not to the file {str(path)!r}")
    if builder == "json":
        check_utf8(p, path)
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        if "corresponds to no data" in str(e):  # a JSON array of no rows
            raise _no_rows(path) from None
        if builder == "json":
            check_json_rows(p, path)
        raise ValueError(f"{path}: cannot be read as {p.suffix} preference data: {e.__cause__ or e}") from e


def check_utf8(p: Path, path) -> None:
    """Raises naming the line and the byte of the first that is not UTF-8 (``datasets`` reads such a file without
    a word and fails when the row is used, naming neither), and for a file of only whitespace. One pass."""
    offset, blank = 0, True
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {number} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                                 f"{offset + e.start} of the file); the file must be UTF-8 encoded: convert it, "
                                 "e.g. with iconv -f <its encoding> -t utf-8") from None
            offset += len(raw)
            blank = blank and not raw.strip(JSON_SPACE)
    if blank:
        raise _no_rows(path)


def check_json_rows(p: Path, path) -> None:
    """Raises naming the line (or element) of the first line that is not JSON, the first row that is no JSON
    object, or the first value whose JSON type differs from its column's first (nulls aside): run when
    ``datasets`` fails, which names no line, or a row counted from the start of a block. Returns when it finds
    none of these."""
    first = {}
    for name, row in _json_rows(p, path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {name} is {_kind(row)}, not a row; every row must be a JSON object of its "
                             "columns")
        for column, value in row.items():
            if value is not None:
                kind, seen_at = first.setdefault(column, (_kind(value), name))
                if _kind(value) != kind:
                    raise ValueError(f"{path}: {name}: {column!r} is {_kind(value)}, but {seen_at} has {kind}; "
                                     "every row must use the same format")


def _json_rows(p: Path, path):
    """(name, parsed row) of each row of a JSON Lines file or a JSON array, in order."""
    if is_json_array(p):
        try:
            rows = json.loads(p.read_bytes())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); a file "
                             "that starts with '[' must hold one JSON array of rows") from None
        yield from ((f"element {i}", row) for i, row in enumerate(rows))
        return
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip(JSON_SPACE):
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                                     "each line must hold one row, a JSON object") from None
                yield f"line {number}", row


def _kind(value) -> str:
    return next(kind for types, kind in JSON_KINDS if isinstance(value, types))


def is_json_array(p: Path) -> bool:
    """Whether a JSON file holds an array of rows (it starts with "["), rather than one row per line."""
    with open(p, "rb") as f:
        head = f.read(1 << 16).removeprefix(codecs.BOM_UTF8).lstrip(JSON_SPACE)
        while not head and (chunk := f.read(1 << 16)):
            head = chunk.lstrip(JSON_SPACE)
    return head.startswith(b"[")


def row_names(source):
    """i -> how messages name row i of the dataset loaded from ``source``: "line n" of a JSON Lines file, "element
    i" of a JSON array, "row i" otherwise (the convention is in ``selpo.data.pairs``). A JSON Lines file is read
    once, at the first name asked for."""
    p = Path(str(source)).expanduser()
    if not p.is_file() or FORMATS.get(p.suffix.lower()) != "json":
        return lambda i: f"row {i}"
    if is_json_array(p):
        return lambda i: f"element {i}"
    numbers = functools.cache(lambda: _row_lines(p))
    return lambda i: f"line {numbers()[i]}"


def _row_lines(p: Path) -> list[int]:
    """The 1-based numbers of the lines that hold a row (``datasets`` skips blank ones)."""
    with open(p, "rb") as f:
        return [number for number, raw in enumerate(f, 1) if raw.strip(JSON_SPACE)]


def _pick_split(loaded, split, path):
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise ValueError(f"split={split!r} given but {str(path)!r} holds a single Dataset, not a DatasetDict")
        return loaded
    if split is None:
        if len(loaded) != 1:
            raise ValueError(f"split: {str(path)!r} holds the splits {sorted(loaded)}; choose one with split=")
        split = next(iter(loaded))
    if split not in loaded:
        raise ValueError(f"split: {split!r} is not in {str(path)!r}, which holds {sorted(loaded)}")
    return loaded[split]


def is_cached_name(value: str) -> bool:
    """Whether ``value``, which is no local path, reads as a dataset name (not as a missing data file)."""
    return bool(CACHED_NAME.fullmatch(value)) and Path(value.partition(":")[0]).suffix.lower() not in FORMATS


def load_cached(name: str, split: str):
    """Split ``split`` of the dataset ``name`` as an earlier ``datasets.load_dataset(name)`` left it in the local
    cache (``$HF_DATASETS_CACHE``), read without any network access; raises naming it when it is not there."""
    import datasets
    from datasets.packaged_modules.cache.cache import Cache

    try:
        builder = Cache(dataset_name=name.split("/")[-1], repo_id=name, version="auto", hash="auto")
    except ValueError:
        raise FileNotFoundError(f"path: {name!r} is neither a local file or folder nor a dataset in the local "
                                f"datasets cache ({datasets.config.HF_DATASETS_CACHE}); selpo never downloads "
                                "data") from None
    splits = list(builder.info.splits or ())
    if split not in splits:
        raise ValueError(f"split: {split!r} is not among the cached splits {splits} of {name!r}; name one as "
                         f"'{name}:SPLIT'")
    return builder.as_dataset(split=split)
