"""selpo.data: loading local preference files, row validation, tokenization, truncation, packed batches."""

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from selpo.data import (  # noqa: E402
    BatchSchedule,
    TokenizedPair,
    collate_pairs,
    default_data_path,
    load_preference_dataset,
    tokenize_pairs,
)
from selpo.head import last_hidden_states, read_head  # noqa: E402
from selpo.kernels import linear_logprobs  # noqa: E402
from selpo.models import load_causal_lm  # noqa: E402
from selpo.testing import tiny_model_dir, tiny_tokenizer  # noqa: E402

ROWS = [
    {"prompt": "Review a zoo.", "chosen": "A great zoo with lovely animals.", "rejected": "Dirty cages, sad animals."},
    {"prompt": "Review the new gym in the city center.", "chosen": "Friendly staff.",
     "rejected": "It smelled awful and the staff were rude."},
    {"prompt": "Review a bakery.", "chosen": "Fresh bread, nice people!", "rejected": "Stale."},
]


def conversational(row):
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok(chat_tok):
    tok = copy.deepcopy(chat_tok)
    tok.chat_template = None
    return tok


def test_every_file_format_loads_the_same_rows(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    for path in (jsonl, tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "saved"):
        assert load_preference_dataset(path).to_list() == ROWS, path
    assert load_preference_dataset(tmp_path / "dict", split="train").to_list() == ROWS
    assert load_preference_dataset(tmp_path / "dict", split="test").to_list() == ROWS[:1]


def test_loading_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder: '.*missing.jsonl'"):
        load_preference_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match="d.csv' has an unsupported suffix"):
        load_preference_dataset(tmp_path / "d.csv")
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + '\n{"prompt": "a", oops\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 2 is not valid JSON .*each line must hold one row"):
        load_preference_dataset(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="split applies only to a saved DatasetDict"):
        load_preference_dataset(write_jsonl(tmp_path / "d.jsonl", ROWS), split="train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a dataset saved with save_to_disk"):
        load_preference_dataset(tmp_path / "empty")
    ds = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"holds the splits \['test', 'train'\]; choose one"):
        load_preference_dataset(tmp_path / "dict")
    with pytest.raises(ValueError, match="'dev' is not in"):
        load_preference_dataset(tmp_path / "dict", split="dev")
    with pytest.raises(TypeError, match="path must be"):
        load_preference_dataset(None)


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]"),
                                           ("empty.parquet", None)])
def test_a_file_without_rows_is_an_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(str(path))
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}: holds no rows of preference data"):
        load_preference_dataset(path)


def test_strings_and_messages_give_the_same_tokens(chat_tok):
    strings, _ = tokenize_pairs(datasets.Dataset.from_list(ROWS), chat_tok, max_length=256)
    ds = datasets.Dataset.from_list([conversational(r) for r in ROWS])
    messages, _ = tokenize_pairs(ds, chat_tok, max_length=256)
    assert strings == messages
    assert [p.row for p in strings] == [0, 1, 2]


def test_chat_template_splits_prompt_and_response(chat_tok):
    (pair, *_), report = tokenize_pairs(datasets.Dataset.from_list(ROWS), chat_tok, max_length=256)
    row = ROWS[0]
    prompt = chat_tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                          add_generation_prompt=True)
    full = chat_tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                         {"role": "assistant", "content": row["chosen"]}], tokenize=False)
    assert chat_tok.decode(pair.prompt_ids) == prompt and prompt.endswith("<|im_start|>assistant\n")
    assert chat_tok.decode(pair.prompt_ids + pair.chosen_ids) == full
    assert chat_tok.decode(pair.chosen_ids) == row["chosen"] + "<|im_end|>\n"
    assert (report.rows, report.kept, report.truncated, report.dropped) == (3, 3, 0, {})


def test_plain_text_without_chat_template_ends_responses_with_eos(plain_tok):
    pairs, _ = tokenize_pairs(datasets.Dataset.from_list(ROWS), plain_tok, max_length=256)
    for pair, row in zip(pairs, ROWS):
        assert pair.prompt_ids == plain_tok(row["prompt"])["input_ids"]
        assert pair.chosen_ids == plain_tok(row["chosen"])["input_ids"] + [plain_tok.eos_token_id]
        assert pair.rejected_ids == plain_tok(row["rejected"])["input_ids"] + [plain_tok.eos_token_id]


def test_conversational_rows_need_a_chat_template(plain_tok):
    ds = datasets.Dataset.from_list([conversational(r) for r in ROWS])
    with pytest.raises(ValueError, match="src row 0: conversational data .* needs a tokenizer with a chat template"):
        tokenize_pairs(ds, plain_tok, max_length=64, source="src")


def test_truncation_rule(plain_tok):
    ds = datasets.Dataset.from_list(ROWS)
    full, _ = tokenize_pairs(ds, plain_tok, max_length=256)
    cut, report = tokenize_pairs(ds, plain_tok, max_length=9, max_prompt_length=3)
    for a, b in zip(full, cut):
        assert b.prompt_ids == a.prompt_ids[-3:]
        room = 9 - len(b.prompt_ids)
        assert b.chosen_ids == a.chosen_ids[:room] and b.rejected_ids == a.rejected_ids[:room]
    expected = sum(len(a.prompt_ids) > 3 or max(len(a.chosen_ids), len(a.rejected_ids)) > 9 - min(3, len(a.prompt_ids))
                   for a in full)
    assert report.truncated == expected > 0 and report.kept == 3
    # Without a prompt limit, a prompt that fills max_length leaves no room: the row is dropped.
    limit = max(len(a.prompt_ids) for a in full)
    too_long = [i for i in range(3) if len(full[i].prompt_ids) == limit]
    assert 0 < len(too_long) < 3
    kept, report = tokenize_pairs(ds, plain_tok, max_length=limit)
    assert report.dropped == {"too_long": len(too_long)}
    assert report.dropped_rows == {"too_long": [f"row {i}" for i in too_long]}
    assert [p.row for p in kept] == [i for i in range(3) if i not in too_long]


def bad_rows_file(tmp_path):
    rows = [
        ROWS[0],                                                            # 0 good
        {"prompt": "a", "chosen": None, "rejected": "b"},                   # 1 missing
        {"prompt": "a", "chosen": "b"},                                     # 2 missing (absent key)
        {"prompt": "a", "chosen": 5, "rejected": "b"},                      # 3 bad_type
        {"prompt": "a", "chosen": "  \n", "rejected": "b"},                 # 4 empty_response
        {"prompt": "a", "chosen": "b", "rejected": ""},                     # 5 empty_response
        conversational(ROWS[1]),                                            # 6 good (messages)
        {**conversational(ROWS[1]), "chosen": [{"role": "assistant"}]},     # 7 bad_type
        {**conversational(ROWS[1]), "rejected": "plain"},                   # 8 bad_type (mixed formats)
        {"prompt": 7, "chosen": "b", "rejected": "c"},                      # 9 bad_type
        ROWS[2],                                                            # 10 good
    ]
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_bad_rows_are_counted_by_reason_and_named_by_line(tmp_path, chat_tok):
    path = bad_rows_file(tmp_path)
    pairs, report = tokenize_pairs(load_preference_dataset(path), chat_tok, max_length=128, source=path)
    assert [p.row for p in pairs] == [0, 6, 10]  # the dataset's indices, which the later stages keep
    assert report.dropped == {"missing": 2, "bad_type": 4, "empty_response": 2}
    # Row i is the file's line i + 1.
    assert report.dropped_rows == {"missing": ["line 2", "line 3"], "empty_response": ["line 5", "line 6"],
                                   "bad_type": ["line 4", "line 8", "line 9", "line 10"]}
    assert (report.rows, report.kept) == (11, 3)
    assert report.to_dict()["dropped"] == report.dropped
    summary = report.summary()
    assert "11 rows, 3 kept" in summary and "bad_type 4 (line 4, line 8, line 9, line 10)" in summary
    assert path in summary


def test_strict_raises_naming_the_file_and_line(tmp_path, chat_tok):
    path = bad_rows_file(tmp_path)
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: chosen is missing \(null\) \(missing; strict=True\)"):
        tokenize_pairs(load_preference_dataset(path), chat_tok, max_length=128, source=path, strict=True)
    ds = datasets.Dataset.from_list([ROWS[0], {"prompt": "a", "chosen": "b", "rejected": " "}])
    with pytest.raises(ValueError, match="src row 1: rejected is empty"):
        tokenize_pairs(ds, chat_tok, max_length=128, source="src", strict=True)


def test_empty_plain_prompt_is_dropped(plain_tok):
    ds = datasets.Dataset.from_list([ROWS[0], {"prompt": "", "chosen": "b", "rejected": "c"}])
    pairs, report = tokenize_pairs(ds, plain_tok, max_length=64)
    assert [p.row for p in pairs] == [0] and report.dropped == {"empty_prompt": 1}


def test_structural_errors_always_raise(chat_tok):
    ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match=r"train.jsonl: missing column\(s\) \['rejected'\]"):
        tokenize_pairs(ds, chat_tok, max_length=64, source="train.jsonl")
    ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "", "rejected": "c"}])
    with pytest.raises(ValueError, match="src: no usable row; .*empty_response 1"):
        tokenize_pairs(ds, chat_tok, max_length=64, source="src")


@pytest.mark.parametrize("kwargs, match", [
    ({"max_length": 1}, "max_length must be an int >= 2"),
    ({"max_length": 8.0}, "max_length must be an int >= 2"),
    ({"max_length": True}, "max_length must be an int >= 2"),
    ({"max_length": 8, "max_prompt_length": 0}, r"max_prompt_length must be None or an int in \[1, max_length=8\]"),
    ({"max_length": 8, "max_prompt_length": 9}, r"max_prompt_length must be None or an int in \[1, max_length=8\]"),
])
def test_length_arguments_are_checked(chat_tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tokenize_pairs(datasets.Dataset.from_list(ROWS), chat_tok, **kwargs)


pair_lists = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(pair_lists, st.integers(0, 3))
def test_collate_packs_response_tokens_and_their_predicting_positions(lengths, pad_id):
    gen = iter(range(10, 10_000))
    pairs = [TokenizedPair([next(gen) for _ in range(a)], [next(gen) for _ in range(b)], [next(gen) for _ in range(c)],
                           row=7 * i) for i, (a, b, c) in enumerate(lengths)]
    batch = collate_pairs(pairs, pad_id)
    p = len(pairs)
    prompts = [q.prompt_ids for q in pairs] * 2
    responses = [q.chosen_ids for q in pairs] + [q.rejected_ids for q in pairs]
    width = max(len(a) + len(b) for a, b in zip(prompts, responses))
    assert batch.input_ids.shape == batch.attention_mask.shape == (2 * p, width)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        n = len(prompt) + len(response)
        assert batch.input_ids[i, :n].tolist() == prompt + response
        assert batch.input_ids[i, n:].eq(pad_id).all()
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (width - n)
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.diff().tolist() == [len(r) for r in responses] and batch.cu_seqlens[0] == 0
    assert batch.targets.tolist() == [t for r in responses for t in r]
    # Position t holds the hidden state that predicts token t + 1, within the same row.
    assert batch.input_ids.flatten()[batch.positions + 1].tolist() == batch.targets.tolist()
    assert (batch.positions // width).tolist() == [i for i, r in enumerate(responses) for _ in r]
    assert batch.rows.tolist() == [7 * i for i in range(p)] and batch.num_pairs == p
    assert batch.to("cpu").targets.tolist() == batch.targets.tolist()


def test_packed_log_probs_equal_each_sequence_on_its_own(tmp_path, chat_tok):
    """The batch layout and the ops together give each response's log-probs as an unpadded forward would."""
    model, tokenizer = load_causal_lm(tiny_model_dir(tmp_path, tokenizer=chat_tok))
    pairs, _ = tokenize_pairs(datasets.Dataset.from_list(ROWS), tokenizer, max_length=256)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    head = read_head(model)
    with torch.no_grad():
        hidden = last_hidden_states(model, batch.input_ids, batch.attention_mask).flatten(0, 1)[batch.positions]
        got = linear_logprobs(hidden, head.weight, batch.targets, backend="torch", **head.op_kwargs())
        expected = []
        sequences = [(q.prompt_ids, q.chosen_ids) for q in pairs] + [(q.prompt_ids, q.rejected_ids) for q in pairs]
        for prompt, response in sequences:
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
            expected.append(torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(response)[:, None])[:, 0])
    torch.testing.assert_close(got.double(), torch.cat(expected), atol=2e-5, rtol=0)


def test_collate_rejects_bad_input():
    good = TokenizedPair([1], [2], [3], row=0)
    with pytest.raises(ValueError, match="pairs must be a non-empty list"):
        collate_pairs([], 0)
    with pytest.raises(ValueError, match="pad_id must be a non-negative int"):
        collate_pairs([good], -1)
    with pytest.raises(TypeError, match="pairs must hold TokenizedPair, got dict"):
        collate_pairs([{"prompt_ids": [1]}], 0)
    with pytest.raises(ValueError, match="row 4 has an empty prompt or response"):
        collate_pairs([good, TokenizedPair([], [2], [3], row=4)], 0)


def test_batch_schedule_is_a_seeded_resumable_sequence_of_epochs():
    schedule = BatchSchedule(10, 3, seed=5)
    assert schedule.steps_per_epoch == 3
    steps = [schedule.indices(s) for s in range(9)]
    for epoch in range(3):
        seen = [i for batch in steps[3 * epoch:3 * epoch + 3] for i in batch]
        assert len(seen) == len(set(seen)) == 9 and set(seen) <= set(range(10))
    assert all(len(b) == 3 for b in steps)
    assert steps[:3] != steps[3:6]
    resumed = schedule.iter_from(4)
    assert [next(resumed) for _ in range(5)] == steps[4:9]
    assert [BatchSchedule(10, 3, seed=5).indices(s) for s in (7, 2)] == [steps[7], steps[2]]
    assert [BatchSchedule(10, 3, seed=6).indices(s) for s in range(3)] != steps[:3]


@pytest.mark.parametrize("args, kwargs, match", [
    ((0, 1), {"seed": 0}, "num_items must be an int >= 1"),
    ((4, 0), {"seed": 0}, "batch_size must be an int >= 1"),
    ((4, 5), {"seed": 0}, "batch_size=5 is larger than the 4 items"),
    ((4, 2), {"seed": -1}, "seed must be an int >= 0"),
])
def test_batch_schedule_checks_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchSchedule(*args, **kwargs)


def test_batch_schedule_checks_the_step():
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        BatchSchedule(4, 2, seed=0).indices(-1)


def test_default_data_paths():
    assert default_data_path("train").endswith(os.path.join("selpo", "default_data", "train.jsonl"))
    assert os.path.isfile(default_data_path("test"))
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\)"):
        default_data_path("dev")
