"""TRL's other preference layouts (selpo.data.formats): implicit prompts, unpaired rows, cached datasets by name."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402

from selpo.data import load_preference_dataset, tokenize_pairs  # noqa: E402
from selpo.data.formats import NoSharedPrompt, is_unpaired, pair_unpaired, row_prompt, split_implicit  # noqa: E402
from selpo.testing import tiny_tokenizer  # noqa: E402

HH = "\n\nHuman: Is the zoo good?\n\nAssistant: Which one?\n\nHuman: The city zoo.\n\nAssistant:"
EXPLICIT = [{"prompt": "Review a zoo.", "chosen": "A great zoo.", "rejected": "Dirty cages."},
            {"prompt": "Review a gym.", "chosen": "Friendly staff.", "rejected": "Rude staff."}]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_string_prompt_ends_at_the_last_turn_marker():
    prompt, chosen, rejected = split_implicit(HH + " It is lovely.", HH + " It is awful.")
    assert (prompt, chosen, rejected) == (HH, " It is lovely.", " It is awful.")


def test_string_prompt_without_marker_keeps_whole_words():
    assert split_implicit("Rate it: I love it", "Rate it: I loathe it") == ("Rate it: I", " love it", " loathe it")
    assert split_implicit("Q: hi\nA: yes", "Q: hi\nA: no") == ("Q: hi\nA:", " yes", " no")


def test_message_prompt_is_the_shared_leading_turns_ending_on_a_user_turn():
    head = [user("hi"), assistant("hello"), user("rate the zoo")]
    assert split_implicit(head + [assistant("great")], head + [assistant("bad")]) == (
        head, [assistant("great")], [assistant("bad")])
    # A shared first reply is not prompt: the prompt must end where the model's turn starts.
    shared = [user("rate it"), assistant("Well,")]
    assert split_implicit(shared + [user("go on"), assistant("good")], shared + [user("and?"), assistant("bad")]) \
        == ([user("rate it")], [assistant("Well,"), user("go on"), assistant("good")],
            [assistant("Well,"), user("and?"), assistant("bad")])


@pytest.mark.parametrize("chosen, rejected", [("good", "bad"), ("  good", "  bad"),
                                              ([user("a"), assistant("x")], [user("b"), assistant("y")])])
def test_nothing_shared_is_no_prompt(chosen, rejected):
    with pytest.raises(NoSharedPrompt):
        split_implicit(chosen, rejected)


def test_implicit_rows_tokenize_like_their_explicit_form(tok):
    implicit = [{"chosen": r["prompt"] + " " + r["chosen"], "rejected": r["prompt"] + " " + r["rejected"]}
                for r in EXPLICIT]
    explicit = [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
                for r in EXPLICIT]
    got, report = tokenize_pairs(datasets.Dataset.from_list(implicit), tok, max_length=64)
    want, _ = tokenize_pairs(datasets.Dataset.from_list(explicit), tok, max_length=64)
    assert got == want and report.kept == 2
    assert row_prompt(implicit[0]) == "Review a zoo." and row_prompt(explicit[1]) == "Review a gym."


def test_conversational_implicit_rows_tokenize_like_their_explicit_form(tok):
    head = [user("hi"), assistant("hello"), user("rate the zoo")]
    implicit = [{"chosen": head + [assistant("great")], "rejected": head + [assistant("bad")]}]
    explicit = [{"prompt": head, "chosen": [assistant("great")], "rejected": [assistant("bad")]}]
    got, _ = tokenize_pairs(datasets.Dataset.from_list(implicit), tok, max_length=64)
    want, _ = tokenize_pairs(datasets.Dataset.from_list(explicit), tok, max_length=64)
    assert got == want


def test_a_row_without_shared_prompt_is_counted_or_raises_naming_file_and_row(tok, tmp_path):
    rows = [{"chosen": HH + " yes", "rejected": HH + " no"}, {"chosen": "good", "rejected": "bad"},
            {"chosen": HH + " fine", "rejected": 3}]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    pairs, report = tokenize_pairs(load_preference_dataset(path), tok, max_length=64, source=str(path))
    assert [p.row for p in pairs] == [0] and report.dropped == {"no_shared_prompt": 1}
    with pytest.raises(ValueError, match=r"hh.jsonl line 2: .*share no prompt.*no_shared_prompt; strict=True"):
        tokenize_pairs(load_preference_dataset(path), tok, max_length=64, source=str(path), strict=True)
    _, report = tokenize_pairs(datasets.Dataset.from_list([rows[0], {"chosen": HH, "rejected": None}]), tok,
                               max_length=64)
    assert report.dropped == {"missing": 1}


def test_missing_columns_name_every_accepted_layout(tok):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]; .*share their prompt"):
        tokenize_pairs(datasets.Dataset.from_list([{"chosen": "a b"}]), tok, max_length=64)


def test_unpaired_rows_pair_per_prompt_in_order():
    rows = [{"prompt": "p", "completion": "good 1", "label": True},
            {"prompt": "q", "completion": "bad q", "label": False},
            {"prompt": "p", "completion": "bad 1", "label": False},
            {"prompt": "p", "completion": "good 2", "label": True},
            {"prompt": "q", "completion": "good q", "label": True},
            {"prompt": "p", "completion": "bad 2", "label": False},
            {"prompt": "p", "completion": "good 3", "label": True}]
    paired, left = pair_unpaired(datasets.Dataset.from_list(rows), "u.jsonl")
    assert left == 1  # "good 3" has no undesirable partner
    assert paired.to_list() == [
        {"prompt": "p", "chosen": "good 1", "rejected": "bad 1", "source_rows": [0, 2]},
        {"prompt": "q", "chosen": "good q", "rejected": "bad q", "source_rows": [4, 1]},
        {"prompt": "p", "chosen": "good 2", "rejected": "bad 2", "source_rows": [3, 5]}]
    with pytest.raises(ValueError, match="u.jsonl row 0: label must be true .* got .true."):
        pair_unpaired(datasets.Dataset.from_list([{**r, "label": str(r["label"]).lower()} for r in rows[:2]]),
                      "u.jsonl")


def test_a_bad_pair_of_unpaired_rows_names_its_source_lines(tok, tmp_path):
    rows = [{"prompt": "p", "completion": "good", "label": True}, {"prompt": "q", "completion": "x", "label": True},
            {"prompt": "p", "completion": " ", "label": False}]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paired, _ = pair_unpaired(load_preference_dataset(path), str(path))
    with pytest.raises(ValueError, match=r"u.jsonl pair 0 \(line 1 and line 3\): rejected is empty"):
        tokenize_pairs(paired, tok, max_length=64, source=str(path), strict=True)
    with pytest.raises(ValueError, match=r"no usable row; .*empty_response 1 \(pair 0 \(line 1 and line 3\)\)"):
        tokenize_pairs(paired, tok, max_length=64, source=str(path))


def test_conversational_unpaired_rows_tokenize_like_their_explicit_form(tok):
    prompt = [user("hi"), assistant("hello"), user("rate the zoo")]
    rows = [{"prompt": prompt, "completion": [assistant("bad")], "label": False},
            {"prompt": prompt, "completion": [assistant("great")], "label": True}]
    paired, left = pair_unpaired(datasets.Dataset.from_list(rows), "u.jsonl")
    explicit = [{"prompt": prompt, "chosen": [assistant("great")], "rejected": [assistant("bad")]}]
    assert left == 0 and paired["source_rows"] == [[1, 0]]
    got, _ = tokenize_pairs(paired, tok, max_length=64)
    want, _ = tokenize_pairs(datasets.Dataset.from_list(explicit), tok, max_length=64)
    assert got == want


@pytest.mark.parametrize("rows, missing", [
    # A labelled dialogue (TRL's language-modeling layout plus a label): no prompt, no completion.
    ([{"messages": [user("rate the zoo"), assistant("great")], "label": True}], r"\['prompt', 'completion'\]"),
    # Unpaired rows whose prompt is left inside the completion: TRL's unpaired format has no implicit prompt.
    ([{"completion": [user("rate the zoo"), assistant("great")], "label": True}], r"\['prompt'\]"),
    ([{"prompt": "Rate the zoo.", "completion": " Great."}], r"\['label'\]"),
])
def test_unpaired_rows_without_a_column_name_file_row_and_column(tmp_path, rows, missing):
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_preference_dataset(path)
    assert is_unpaired(dataset.column_names)
    with pytest.raises(ValueError, match=rf"u.jsonl line 1 \(and every row\): missing column\(s\) {missing}; .*"
                                         r"no implicit-prompt form"):
        pair_unpaired(dataset, str(path))


def test_an_unpaired_row_without_its_prompt_names_the_row(tmp_path):
    path = tmp_path / "u.jsonl"
    rows = [{"prompt": "p", "completion": "good", "label": True}, {"completion": "bad", "label": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"u.jsonl line 2: missing 'prompt'"):
        pair_unpaired(load_preference_dataset(path), str(path))
    assert not is_unpaired(["prompt", "chosen", "rejected", "label"]) and not is_unpaired(["chosen", "rejected"])


def test_a_dataset_in_the_local_cache_loads_by_name_offline(tmp_path, monkeypatch):
    """A cache entry as ``load_dataset("tester/prefs")`` leaves it, made here from a local file."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in EXPLICIT))
    datasets.load_dataset("json", data_files={"train": str(data), "test": str(data)},
                          cache_dir=str(tmp_path / "cache"))
    (config,) = (tmp_path / "cache" / "json").iterdir()
    named = tmp_path / "cache" / "tester___prefs"
    named.mkdir()
    config.rename(named / "default")
    for arrow in named.rglob("json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", "prefs-")))
    assert load_preference_dataset("tester/prefs").to_list() == EXPLICIT
    assert load_preference_dataset("tester/prefs:test").to_list() == EXPLICIT
    with pytest.raises(ValueError, match=r"split: 'dev' is not among the cached splits"):
        load_preference_dataset("tester/prefs:dev")
    with pytest.raises(FileNotFoundError, match="'tester/absent' is neither a local file .* never downloads"):
        load_preference_dataset("tester/absent")
    assert not Path("tester").exists()
