"""A run folder cannot lose a user's data (issue 25): what selpo writes, deletes, reads back and imports, and
that one process at a time works in a folder (selpo.run_folder, selpo.input_hashes, selpo.cli).

Every probe runs the `selpo` command in a temporary folder and checks that the files outside the run folder
are untouched, byte for byte (``untouched``)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selpo.context import DONE
from selpo.run_folder import STAGE_RECORD, RunFolder, RunFolderError

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import finished_run  # noqa: E402
from cli_runs import selpo as _selpo  # noqa: E402
from tiny_data import write_pairs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes]:
    """Every file under ``root`` (links as their target's text), outside ``skip`` and the lock and caches of
    ``.selpo/``, with its bytes."""
    files = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents) or ".selpo" in path.parts:
            continue
        if path.is_symlink():
            files[str(path)] = b"-> " + os.readlink(path).encode()
        elif path.is_file():
            files[str(path)] = path.read_bytes()
    return files


class untouched:
    """A block after which every file under ``root`` outside ``run_dir`` is as it was."""

    def __init__(self, root: Path, run_dir: Path | None = None):
        self.root, self.run_dir = root, run_dir

    def __enter__(self):
        self.before = snapshot(self.root, self.run_dir)

    def __exit__(self, *exc):
        assert snapshot(self.root, self.run_dir) == self.before, "a file outside the run folder changed"


@pytest.fixture(scope="module")
def finished(tiny_run):
    """A finished dpo run (data, train, eval, report: the quickest method)."""
    root, settings = tiny_run
    return finished_run(root / "done", settings, "--set", "method=dpo")


def copy_run(run_dir: Path, where: Path) -> Path:
    copy = where / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    return copy


# -- 1. inputs are never overwritten -----------------------------------------------------------------------------

def test_an_input_inside_the_run_folder_is_refused_before_any_write(tiny_run, tmp_path):
    _, settings = tiny_run
    run_dir = tmp_path / "myrun"
    (run_dir / "data").mkdir(parents=True)
    inside = write_pairs(run_dir / "data" / "train.jsonl", 20)
    before = snapshot(tmp_path)
    code, _, err = _selpo("data", "--run-dir", run_dir, *settings, "--set", f"data.train={inside}")
    assert code == 1
    assert f"data.train: {inside} lies inside the run folder {run_dir}" in err and "move it out" in err
    assert snapshot(tmp_path) == before  # nothing written, in the run folder or beside it


def test_a_config_the_user_kept_in_the_run_folder_is_neither_read_nor_overwritten(tiny_run, tmp_path):
    _, settings = tiny_run
    run_dir = tmp_path / "myrun"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("# my notes\nseed = 3\n")
    before = snapshot(tmp_path)
    code, _, err = _selpo("data", "--run-dir", run_dir, *settings)
    assert code == 1 and f"{run_dir / 'config.toml'} was not written by selpo" in err
    assert snapshot(tmp_path) == before
    code, _, err = _selpo("data", "--run-dir", run_dir, "--config", run_dir / "config.toml", *settings)
    assert code == 1 and "--config: " in err and "lies inside the run folder" in err
    assert snapshot(tmp_path) == before


def test_a_stage_folder_holding_a_users_file_is_refused_and_fresh_removes_nothing(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "data" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for args in (("data", "--fresh"), ("data",)):
        code, _, err = _selpo(*args, "--run-dir", run_dir)
        assert code == 1, args
        assert f"{run_dir / 'data'} holds what selpo did not write (notes.txt)" in err
        assert snapshot(tmp_path) == before


def test_a_folder_the_user_made_where_a_stage_writes_is_refused(tiny_run, tmp_path):
    _, settings = tiny_run
    run_dir = tmp_path / "myrun"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "train.jsonl").write_text("my own rows\n")
    with untouched(tmp_path):
        code, _, err = _selpo("data", "--run-dir", run_dir, *settings)
    assert code == 1 and "holds what selpo did not write (train.jsonl)" in err


def test_fresh_removes_what_selpo_wrote(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    with untouched(tmp_path, run_dir):
        code, _, err = _selpo("report", "--fresh", "--run-dir", run_dir)
    assert code == 0, err[-2000:]
    assert (run_dir / "report" / DONE).is_file()
    assert json.loads((run_dir / "report" / STAGE_RECORD).read_text())["state"] == "finished"


def test_an_interrupted_stage_owns_what_it_left(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    folder = RunFolder(run_dir)
    folder.begin_stage("report")  # as a run killed mid-stage leaves it
    (run_dir / "report" / "half-written.png").write_text("")
    assert folder.foreign_files("report") == []
    folder.clear_stage("report")
    assert not (run_dir / "report").exists()


# -- 2. no write or delete outside the run folder ---------------------------------------------------------------

def test_the_run_folder_is_never_taken_from_a_run_folders_config(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    config = run_dir / "config.toml"
    config.write_text(re.sub(r'(?m)^run_dir = .*$', f'run_dir = "{elsewhere}"', config.read_text()))
    with untouched(tmp_path, run_dir):
        code, out, err = _selpo("run", "--run-dir", run_dir)
    assert code == 0, err[-2000:]
    assert out.count("done, skipped") == 4 and not elsewhere.exists()
    assert f"run folder: {run_dir}" in out
    assert f"report: {run_dir / 'report.html'}" in out  # this folder's report, not the one it was copied from


def test_a_stage_folder_linking_out_is_refused(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    outside = tmp_path / "outside"
    shutil.move(run_dir / "report", outside)
    (run_dir / "report").symlink_to(outside)
    before = snapshot(tmp_path)
    for args in (("report",), ("report", "--fresh")):
        code, _, err = _selpo(*args, "--run-dir", run_dir)
        assert code == 1, args
        assert f"{run_dir / 'report'} is a link to {outside.resolve()}, outside the run folder" in err
        assert snapshot(tmp_path) == before


def test_a_link_inside_a_stage_folder_is_refused(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (run_dir / "train" / "metrics.jsonl").unlink()
    (run_dir / "train" / "metrics.jsonl").symlink_to(target)
    with untouched(tmp_path, run_dir):
        code, _, err = _selpo("train", "--run-dir", run_dir)
    assert code == 1 and "holds what selpo did not write (metrics.jsonl)" in err


# -- 3. a run folder's config never runs code by itself --------------------------------------------------------

HOSTILE = """
from pathlib import Path
Path({marker!r}).write_text("ran")
def score(prompts, responses):
    return [0.0] * len(responses)
"""


def test_a_reward_function_read_from_a_run_folder_needs_confirming(finished, tmp_path, monkeypatch):
    run_dir = copy_run(finished, tmp_path)
    marker = tmp_path / "imported.txt"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "hostile_reward.py").write_text(HOSTILE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    config = run_dir / "config.toml"
    config.write_text(re.sub(r'(?m)^reward = .*$', 'reward = "hostile_reward:score"', config.read_text()))
    for command in ("eval", "run", "config"):
        code, _, err = _selpo(command, "--run-dir", run_dir)
        assert code == 1, command
        assert "eval.reward: " in err and "'hostile_reward:score', a function selpo would import" in err
        assert "--set eval.reward=hostile_reward:score" in err
        assert not marker.exists()  # nothing was imported
    code, out, err = _selpo("config", "--run-dir", run_dir, "--set", "eval.reward=hostile_reward:score")
    assert code == 0 and 'reward = "hostile_reward:score"' in out


# -- 4. results follow the data's contents ----------------------------------------------------------------------

def test_an_edited_input_redoes_exactly_the_stages_it_feeds(tiny_run, tmp_path):
    root, settings = tiny_run
    train = tmp_path / "train.jsonl"
    shutil.copy(next(s for s in settings if s.startswith("data.train=")).partition("=")[2], train)
    settings = [*settings, "--set", f"data.train={train}", "--set", "method=dpo"]
    run_dir = tmp_path / "run"
    assert _selpo("run", "--run-dir", run_dir, *settings)[0] == 0
    code, out, _ = _selpo("run", "--run-dir", run_dir, *settings)
    assert code == 0 and out.count("done, skipped") == 4
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    train.write_text("".join(json.dumps(r) + "\n" for r in swapped))
    code, out, err = _selpo("run", "--run-dir", run_dir, *settings)
    assert code == 0, err[-2000:]
    assert "== data: redone, as the contents of its input changed (data.train)" in out
    assert "done, skipped" not in out  # train, eval and report read the data
    pairs = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
    assert pairs[0]["chosen_ids"] != pairs[0]["rejected_ids"]


def test_the_content_hash_is_cached_by_size_and_time(tmp_path):
    from selpo import input_hashes

    path = tmp_path / "a.txt"
    path.write_text("one")
    (tmp_path / ".selpo").mkdir()
    first = input_hashes.content_hash(path, tmp_path)
    cached = json.loads((tmp_path / ".selpo" / "hashes.json").read_text())
    assert cached[str(path.resolve())]["sha256"] == first
    path.write_text("two")
    assert input_hashes.content_hash(path, tmp_path) != first


# -- 5. one process at a time ------------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from selpo.run_folder import RunFolder
    with RunFolder(sys.argv[1]).locked("holder-command"):
        print("locked", flush=True)
        time.sleep(60)
""")


def _hold(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_on_the_folder_stops_at_once_naming_the_holder(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    holder = _hold(run_dir)
    try:
        before = snapshot(tmp_path)
        code, _, err = _selpo("report", "--fresh", "--run-dir", run_dir)
        assert code == 1
        assert f"{run_dir} is in use by another selpo process" in err
        assert f'"pid": {holder.pid}' in err and "holder-command" in err
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    code, _, err = _selpo("report", "--run-dir", run_dir)  # a killed holder leaves no lock behind
    assert code == 0, err[-2000:]


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = _hold(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with RunFolder(tmp_path / "run").locked():
        pass


# -- 6. named errors instead of tracebacks ----------------------------------------------------------------------

def test_a_run_dir_that_is_a_file_or_empty_is_named(tiny_run, tmp_path):
    _, settings = tiny_run
    file = tmp_path / "run"
    file.write_text("not a folder")
    code, _, err = _selpo("data", "--run-dir", file, *settings)
    assert code == 1 and f"run_dir: {file} is a file, not a folder" in err and "Traceback" not in err
    code, _, err = _selpo("data", "--run-dir", "", *settings)
    assert code == 1 and "run_dir: empty; name the run's folder" in err


def test_a_run_dir_that_cannot_be_written_is_named(tiny_run):
    _, settings = tiny_run
    code, _, err = _selpo("data", "--run-dir", "/sys/selpo-test-run", *settings)
    assert code == 1 and "run_dir: cannot write in /sys/selpo-test-run" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncate optimizer.bin", "delete optimizer.bin", "garble latest.json"])
def test_a_broken_checkpoint_names_the_file_and_how_to_restart(finished, tmp_path, damage):
    run_dir = copy_run(finished, tmp_path)
    checkpoints = run_dir / "train" / "checkpoints"
    step = next(checkpoints.glob("step-*"))
    what, _, name = damage.partition(" ")
    if what == "truncate":
        (step / name).write_bytes((step / name).read_bytes()[:100])
    elif what == "delete":
        (step / name).unlink()
    else:
        (checkpoints / name).write_text("{")
    broken = checkpoints / name if name == "latest.json" else step / name
    (run_dir / "train" / DONE).unlink()
    with untouched(tmp_path, run_dir):
        code, _, err = _selpo("train", "--run-dir", run_dir)
    assert code == 1 and "Traceback" not in err
    assert f"checkpoint {broken} cannot be read" in err
    assert "run its stage with --fresh" in err and f"delete {checkpoints}" in err


def test_run_folder_rejects_bad_paths_in_the_python_api(tmp_path):
    with pytest.raises(RunFolderError, match="run_dir: empty"):
        RunFolder("  ")
    folder = RunFolder(tmp_path / "run")
    folder.prepare()
    with pytest.raises(RunFolderError, match="lies inside the run folder"):
        folder.check_input("data.train", tmp_path / "run" / ".selpo")
    with pytest.raises(RunFolderError, match="lies inside the input folder"):
        folder.check_input("model", tmp_path)
    folder.check_input("data.train", tmp_path / "elsewhere.jsonl")  # beside it is fine
    (tmp_path / "beside.jsonl").write_text("")
    folder.check_input("data.train", tmp_path / "beside.jsonl")


def test_a_single_stage_checks_its_reward_before_any_work(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    broken = tmp_path / "reward-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "num_labels": 1}))
    before = snapshot(run_dir)
    code, _, err = _selpo("eval", "--run-dir", run_dir, "--set", f"eval.reward={broken}")
    assert code == 1 and "eval.reward" in err and str(broken) in err and "Traceback" not in err
    assert snapshot(run_dir) == before  # eval's outputs untouched
