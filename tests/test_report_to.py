"""Metrics to experiment trackers (``report_to``, selpo.tracking): a tiny SePO run logged to TensorBoard, read back
from its event file and compared with what the run folder holds (metrics.jsonl, eval's DONE.json); bad tracker
names; the logs folder kept as a stage folder is (selpo.run_folder)."""

import json
import shutil
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from selpo.config import RunConfig, load
from selpo.context import DONE
from selpo.run_folder import LOGS, STAGE_RECORD
from selpo.tracking import PROJECT, _tag
from selpo.trainer import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import finished_run  # noqa: E402
from cli_runs import selpo as _selpo  # noqa: E402


@pytest.fixture(scope="module")
def logged(tiny_run):
    """A SePO run (oracle, score, train, eval) with report_to = tensorboard: (run folder, its event file read)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, settings = tiny_run
    run_dir = finished_run(root / "run", settings, "--set", "report_to=tensorboard")
    events = EventAccumulator(str(run_dir / LOGS / PROJECT))
    events.Reload()
    return run_dir, events


def leaves(values: dict, prefix: str) -> dict:
    """Every number under ``values`` (bools, strings and None left out), keyed by its path below ``prefix``."""
    found, todo = {}, [(prefix, values)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, dict):
            todo += [(f"{path}/{key}", inner) for key, inner in value.items()]
        elif type(value) in (int, float):
            found[path] = value
    return found


def test_every_training_record_and_evals_results_reach_tensorboard(logged):
    run_dir, events = logged
    expected = {}  # tag -> [(step, value)]
    for stage in ("oracle", "train"):
        records = read_metrics(run_dir / stage)
        assert len(records) == 3
        for record in records:
            for tag, value in leaves(record, stage).items():
                expected.setdefault(tag, []).append((record["step"], value))
    results = json.loads((run_dir / "eval" / DONE).read_text())["summary"]
    evaluated = leaves(results, "eval")
    assert {"eval/policy/reward", "eval/policy/kl", "eval/initial/likelihood_accuracy",
            "eval/oracle/implicit_accuracy"} <= set(evaluated)
    assert {"oracle/loss", "oracle/accuracy", "oracle/lr", "oracle/grad_norm", "train/loss"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected) | set(evaluated)
    for tag, points in expected.items():
        logged_points = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged_points] == [s for s, _ in points], tag
        assert [v for _, v in logged_points] == pytest.approx([v for _, v in points], rel=1e-6), tag
    for tag, value in evaluated.items():
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([value], rel=1e-6), tag
    table = [t for t in events.Tags()["tensors"] if t.startswith("eval/results")]
    assert len(table) == 1
    text = events.Tensors(table[0])[0].tensor_proto.string_val[0].decode()
    assert "| metric | initial | policy |" in text and "| kl | 0 |" in text


def test_the_logs_folder_is_selpos_and_a_users_file_there_stops_the_next_command(logged, tmp_path):
    run_dir, _ = logged
    record = json.loads((run_dir / LOGS / STAGE_RECORD).read_text())
    assert record["state"] == "finished" and any(f.startswith(f"{PROJECT}/events.out") for f in record["files"])
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / LOGS / "notes.txt").write_text("mine")
    code, _, err = _selpo("run", "--run-dir", copy)  # report_to = tensorboard read back from its config.toml
    assert code == 1 and "notes.txt" in err and "report_to" in err
    assert (copy / LOGS / "notes.txt").read_text() == "mine"


def test_trackers_end_when_a_command_fails(tiny_run, tmp_path):
    _, settings = tiny_run
    code, _, err = _selpo("train", "--run-dir", tmp_path / "run", *settings, "--set", "report_to=tensorboard")
    assert code == 1 and "has not run" in err
    assert json.loads((tmp_path / "run" / LOGS / STAGE_RECORD).read_text())["state"] == "finished"


def test_default_none_writes_no_logs_folder(tiny_run, tmp_path):
    _, settings = tiny_run
    code, _, err = _selpo("data", "--run-dir", tmp_path / "run", *settings)
    assert code == 0, err[-3000:]
    assert (tmp_path / "run" / "data" / DONE).is_file() and not (tmp_path / "run" / LOGS).exists()


def test_bad_tracker_names_raise_naming_report_to(monkeypatch):
    with pytest.raises(ValueError, match=r"^report_to names unknown tracker\(s\) tensorbord; Accelerate"):
        RunConfig(report_to="tensorbord")
    with pytest.raises(ValueError, match="^report_to takes 'none' or tracker names"):
        load(None, ["report_to=none,tensorboard"])
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match="^report_to names tensorboard, whose package is not installed: pip install "
                       "tensorboard$"):
        RunConfig(report_to="tensorboard")
    with pytest.raises(ValueError, match="^report_to is 'all', but no tracker is installed: pip install tensorboard"):
        RunConfig(report_to="all")


def test_the_cli_names_report_to_before_any_work(tmp_path):
    code, _, err = _selpo("run", "--run-dir", tmp_path / "run", "--set", "report_to=nope")
    assert code == 1 and "selpo: error: report_to names unknown tracker(s) nope" in err
    assert not (tmp_path / "run").exists()


def test_each_training_is_tagged_by_its_folder_in_the_run_folder():
    accelerator = SimpleNamespace(logging_dir=str(Path("runs/x") / LOGS))
    assert _tag(accelerator, Path("runs/x/oracle")) == "oracle"
    assert _tag(accelerator, Path("runs/x/train/rewards/round-1")) == "train/rewards/round-1"  # guidance's rounds
    assert _tag(accelerator, Path("elsewhere/out")) == "out"



def wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``, what ``wandb sync`` uploads): a 7-byte header
    (":W&B", a magic number, a version), then LevelDB's log format, 32 KiB blocks of chunks, each a CRC, a
    length, a type (1 a whole record, 2-4 its first, middle, last part) and its bytes; a record is a protobuf
    ``Record``. Read here because W&B (0.31) ships no reader of its own in Python."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    at, record = 7, b""
    while at + 7 <= len(data):
        left = block - at % block
        _, length, kind = struct.unpack("<IHB", data[at:at + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of the block is padding
            at += left
            continue
        record += data[at + 7:at + 7 + length]
        at += 7 + length
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            record = b""
            yield parsed


def test_wandb_offline_logs_every_training_record_evals_results_and_the_settings(tiny_run, tmp_path):
    """W&B in offline mode (nothing uploaded; ``wandb sync`` would): one offline run under the run folder's
    logs/, whose history, read back from its run file, holds every training record at its values with its own
    ``<training>/step``, eval's numbers and its table, and whose config is the run's settings."""
    root, settings = tiny_run
    run_dir = finished_run(tmp_path / "run", settings, "--set", "report_to=wandb")
    (run_file,) = (run_dir / LOGS / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    for stage in ("oracle", "train"):
        records = read_metrics(run_dir / stage)
        logged = [h for h in history if f"{stage}/loss" in h]
        assert len(records) == len(logged) == 3
        for record, entry in zip(records, logged):
            expected = leaves(record, stage)
            assert {tag: entry[tag] for tag in expected} == pytest.approx(expected, rel=1e-6)
    evaluated = leaves(json.loads((run_dir / "eval" / DONE).read_text())["summary"], "eval")
    (entry,) = [h for h in history if "eval/policy/reward" in h]
    assert {tag: entry[tag] for tag in evaluated} == pytest.approx(evaluated, rel=1e-6)
    (table,) = [h for h in history if "eval/results/_type" in h]
    assert table["eval/results/_type"] == "table-file" and table["eval/results/ncols"] == 3
    (table_file,) = run_file.parent.glob("files/media/table/eval/results_*.table.json")
    rows = {row[0]: row[1:] for row in json.loads(table_file.read_text())["data"]}
    assert rows["kl"] == pytest.approx([evaluated["eval/initial/kl"], evaluated["eval/policy/kl"]])
    used = load(run_dir / "config.toml")
    assert config["method"] == used.method and config["train.lr"] == used.train.lr
