"""Reading preference data from local files through the ``datasets`` library (never from a hub)."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
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
    validates every row (see ``selpo.data.pairs``); but a source with no row at all is an error naming it.
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
    if builder == "json" and _blank(p):  # `datasets` raises StopIteration on an empty file
        raise _no_rows(path)
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise ValueError(f"{path}: cannot be read as {p.suffix} preference data: {cause}") from e
    except ValueError as e:  # a JSON array of no rows: `datasets` says 'Instruction "train" corresponds to no data!'
        if "corresponds to no data" in str(e):
            raise _no_rows(path) from None
        raise


def _blank(path: Path) -> bool:
    """Whether a text file holds nothing but whitespace (read until its first other byte)."""
    with open(path, "rb") as f:
        return not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 20), b""))


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
