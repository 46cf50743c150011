"""Reading preference data from local files through the ``datasets`` library (never from a hub)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_SPLITS = ("train", "test")


def default_data_path(split: str) -> str:
    """The shipped default dataset (controlled-sentiment reviews, see ``selpo.sentiment``): "train" or "test"."""
    if split not in DEFAULT_SPLITS:
        raise ValueError(f"split must be one of {DEFAULT_SPLITS}, got {split!r}")
    return str(resources.files("selpo") / "default_data" / f"{split}.jsonl")


def load_preference_dataset(path: str | os.PathLike, *, split: str | None = None):
    """A ``datasets.Dataset`` of preference rows from a local file or folder.

    Files: JSON Lines (``.jsonl``), JSON (``.json``: an array of rows) or Parquet (``.parquet``). A folder
    is a dataset saved with ``save_to_disk``; a saved ``DatasetDict`` needs ``split`` unless it holds one
    split. Rows are not checked here: ``tokenize_pairs`` validates every row (see ``selpo.data.pairs``).
    """
    import datasets

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or folder path, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.exists():
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
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise ValueError(f"{path}: cannot be read as {p.suffix} preference data: {cause}") from e


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
