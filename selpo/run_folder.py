"""The run folder: what selpo may write and delete there, and that one process at a time works in it.

A run folder holds the stage folders (``<stage>/``), ``config.toml``, ``report.html``, ``logs/`` (the trackers'
of ``report_to``, kept as a stage folder is) and ``.selpo/`` (the lock, the manifest, the cache of input hashes);
nothing else is selpo's. The rules, checked before any write:

- **Only inside.** selpo writes and deletes only inside the run folder and never through a symbolic link
  that leads out of it. The one exception is a stage folder that ``selpo compare`` links to the stage its
  runs share, and only while compare itself runs it (``shared_root``).
- **Only its own files.** Each stage folder carries a record (``.selpo-stage.json``) of the files selpo wrote
  there. A file it does not list (a user's file, a link) stops the stage, and ``--fresh``, before anything is
  written or removed, naming the file. A stage that was interrupted lists nothing yet: what appeared in its
  folder since it started is its own. ``config.toml`` and ``report.html`` are selpo's when ``.selpo/manifest.json``
  lists them: an unlisted one is never read as the run's settings, never overwritten.
- **No input inside.** No file the run reads (data, model folders, a reward model, a ``--config`` file) may lie
  in the run folder, whose files selpo rewrites.
- **One at a time.** A command holds ``.selpo/lock`` (``flock``) while it works; the system releases it when
  the process ends, however it ends, so a killed run leaves no lock behind. A second command on the same
  folder stops at once, naming the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from .atomic import write_text_atomic

STATE = ".selpo"
MANIFEST = "manifest.json"
LOCK = "lock"
STAGE_RECORD = ".selpo-stage.json"
# The files selpo writes at the top of a run folder, besides the stage folders and STATE.
OWN_FILES = ("config.toml", "report.html")
# The experiment trackers' folder (``report_to``), with a record of selpo's files in it as a stage folder has.
LOGS = "logs"


class RunFolderError(ValueError):
    """The run folder cannot be used as asked: the message says why and what to do."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_run_dir(value) -> None:
    """``run_dir`` names a folder: not empty, not a file."""
    if not str(value).strip():
        raise RunFolderError("run_dir: empty; name the run's folder, e.g. --run-dir runs/my-run")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"run_dir: {path} is a file, not a folder; name a folder for the run")


class RunFolder:
    """One run folder and the rules of this module's docstring. ``shared_root``: a folder that stage folders
    may link into (``selpo compare``'s, given by compare itself, never read from the run folder)."""

    def __init__(self, path, *, shared_root: str | os.PathLike | None = None):
        check_run_dir(path)
        self.path = Path(path).expanduser()
        self.shared_root = None if shared_root is None else Path(shared_root).expanduser().resolve()
        self._lock_fd: int | None = None
        self._depth = 0

    # -- the folder itself -------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Creates the folder and ``.selpo/``; raises when either cannot be written."""
        check_run_dir(self.path)
        state = self.path / STATE
        if state.is_symlink():
            raise RunFolderError(f"run_dir: {state} is a link; selpo keeps its lock and manifest there and writes "
                                 "only inside the run folder: remove the link")
        try:
            state.mkdir(parents=True, exist_ok=True)
            probe = state / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise RunFolderError(f"run_dir: cannot write in {self.path} ({e.strerror or e}); choose a folder you "
                                 "can write to") from None

    @contextlib.contextmanager
    def locked(self, command: str = ""):
        """Holds the folder's lock for the block (re-entrant within this object); raises naming the holder when
        another process has it."""
        if self._depth == 0:
            self.prepare()
            path = self.path / STATE / LOCK
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunFolderError(f"run_dir: {self.path} is in use by another selpo process ({holder}); wait for "
                                     "it to end or use another run folder") from None
            os.ftruncate(fd, 0)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "command": command or " ".join(sys.argv)}
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            self._lock_fd = fd
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- inputs ------------------------------------------------------------------------------------------------

    def check_input(self, key: str, value) -> None:
        """Raises when the input ``value`` (of option ``key``) lies inside the run folder or a stage folder it
        links to, whose files selpo rewrites and ``--fresh`` removes, or when it is a folder that holds the run
        folder (the run's own writes would change it)."""
        path = Path(value).expanduser()
        if not path.exists():
            return
        real, run = path.resolve(), self.path.resolve()
        for root in [run] + [link.resolve() for link in self._linked_stages()]:
            if _inside(real, root):
                raise RunFolderError(f"{key}: {value} lies inside the run folder {self.path}, whose files selpo "
                                     "rewrites (and --fresh removes); move it out of the run folder, or choose "
                                     "another run folder")
        if real.is_dir() and _inside(run, real):
            raise RunFolderError(f"{key}: the run folder {self.path} lies inside the input folder {value}, which "
                                 "the run's own files would change; choose a run folder outside it")

    def _linked_stages(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if p.is_symlink()]

    # -- the files at the top: config.toml, report.html ------------------------------------------------------

    def _manifest(self) -> dict:
        path = self.path / STATE / MANIFEST
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunFolderError(f"run_dir: {path} is not selpo's manifest (not JSON); this is no selpo run folder "
                                 "of this version: use another run folder") from None

    def own_file(self, name: str) -> Path | None:
        """The path of the top-level file ``name`` (one of OWN_FILES) when selpo wrote it, None when it does not
        exist; raises when it exists and is a link or a file selpo did not write."""
        path = self.path / name
        if path.is_symlink():
            raise RunFolderError(f"run_dir: {path} is a link; selpo writes only inside the run folder and never "
                                 "through a link: remove it")
        if not path.exists():
            return None
        if name not in self._manifest().get("files", []):
            raise RunFolderError(f"run_dir: {path} was not written by selpo, which would overwrite it; move it out "
                                 "of the run folder (a configuration of yours: pass it with --config FILE from "
                                 "outside), or choose another run folder")
        return path

    def write_own_file(self, name: str, text: str) -> Path:
        """Writes the top-level file ``name`` (checked by ``own_file``) and records it in the manifest."""
        self.own_file(name)
        manifest = self._manifest()
        if name not in manifest.get("files", []):
            manifest["files"] = sorted({*manifest.get("files", []), name})
            write_text_atomic(self.path / STATE / MANIFEST, json.dumps(manifest, indent=1))
        path = self.path / name
        write_text_atomic(path, text)
        return path

    # -- stage folders -----------------------------------------------------------------------------------------

    def stage_path(self, name: str) -> Path:
        """The folder of stage ``name``, checked to be a folder selpo may write: inside the run folder or, when
        a link, inside ``shared_root``."""
        path = self.path / name
        if path.is_symlink():
            target = path.resolve()
            if self.shared_root is None or not _inside(target, self.shared_root):
                raise RunFolderError(f"run_dir: {path} is a link to {target}, outside the run folder; selpo writes "
                                     "only inside it and never through a link (a stage `selpo compare` shares "
                                     "between its runs is written by `selpo compare` only): remove the link")
        elif path.exists() and not path.is_dir():
            raise RunFolderError(f"run_dir: {path} is a file where selpo keeps the {name} stage's folder; move it")
        return path

    def _record(self, folder: Path) -> dict | None:
        path = folder / STAGE_RECORD
        try:
            return json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def foreign_files(self, name: str) -> list[str]:
        """The entries of stage ``name``'s folder selpo did not write (relative paths; links always count)."""
        folder = self.stage_path(name)
        if not folder.exists():
            return []
        record = self._record(folder)
        files, links = _listing(folder)
        if record is None:
            return sorted(files + links)
        if record.get("state") == "running":  # interrupted: what it left is its own
            return sorted(links)
        listed = set(record.get("files", []))
        return sorted([f for f in files if f not in listed] + links)

    def _refuse_foreign(self, name: str, doing: str) -> None:
        foreign = self.foreign_files(name)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise RunFolderError(f"run_dir: {self.path / name} holds what selpo did not write ({shown}); {doing} "
                                 "would overwrite or remove it. Move it out of the run folder, or choose another "
                                 "run folder")

    def begin_stage(self, name: str) -> Path:
        """Checks stage ``name``'s folder holds only selpo's files, creates it, marks the stage as running."""
        self._refuse_foreign(name, f"running the {name} stage")
        folder = self.stage_path(name)
        record = self._record(folder) or {}
        files = _listing(folder)[0] if folder.exists() else []
        folder.mkdir(parents=True, exist_ok=True)
        listed = sorted(set(record.get("files", [])) | set(files))
        write_text_atomic(folder / STAGE_RECORD, json.dumps({"state": "running", "files": listed}))
        return folder

    def begin_logs(self) -> Path:
        """The trackers' folder, checked, created and marked as being written as a stage's (``begin_stage``)."""
        self._refuse_foreign(LOGS, "writing the trackers' logs (report_to)")
        return self.begin_stage(LOGS)

    def end_stage(self, name: str) -> None:
        """Records every file in stage ``name``'s folder as selpo's: the stage finished."""
        folder = self.stage_path(name)
        write_text_atomic(folder / STAGE_RECORD, json.dumps({"state": "finished", "files": _listing(folder)[0]}))

    def clear_stage(self, name: str) -> None:
        """Removes stage ``name``'s outputs (``--fresh``), after checking the folder holds only selpo's files."""
        self._refuse_foreign(name, "--fresh")
        folder = self.stage_path(name)
        if folder.is_symlink():  # a stage compare shares: empty its target, keep the link
            target = folder.resolve()
            shutil.rmtree(target)
            target.mkdir()
        elif folder.exists():
            shutil.rmtree(folder)


def _listing(folder: Path) -> tuple[list[str], list[str]]:
    """(regular files, links) under ``folder`` as sorted relative paths, the stage record left out; links are
    never followed."""
    files, links = [], []
    for root, dirs, names in os.walk(folder):
        base = Path(root)
        for d in list(dirs):
            if (base / d).is_symlink():
                links.append(str((base / d).relative_to(folder)))
                dirs.remove(d)
        for n in names:
            path = base / n
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                links.append(rel)
            elif rel != STAGE_RECORD:
                files.append(rel)
    return sorted(files), sorted(links)
