"""Data errors name the file, the row as the file numbers it (a JSON Lines file's line), and what to do."""

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
from jinja2.exceptions import TemplateSyntaxError  # noqa: E402
from test_formats import assistant, user  # noqa: E402

import selpo.data.pairs as pairs_module  # noqa: E402
from selpo.data import load_preference_dataset, tokenize_pairs  # noqa: E402
from selpo.testing import tiny_tokenizer  # noqa: E402

GOOD = {"prompt": "Review a zoo.", "chosen": "A great zoo.", "rejected": "Dirty cages."}
EMPTY = {"prompt": "Review a gym.", "chosen": " ", "rejected": "Rude staff."}


def line(row):
    return json.dumps(row) + "\n"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tokenize(path, tok, **kwargs):
    return tokenize_pairs(load_preference_dataset(path), tok, max_length=64, source=str(path), **kwargs)


# The same three rows, the second one bad, in each format; the name the file gives that row.
def jsonl_with_blank_lines(path):
    path.write_text(line(GOOD) + "\n   \n" + line(EMPTY) + "\r\n" + line(GOOD))


def json_lines_in_a_json_file(path):
    path.write_text("\n" + line(GOOD) + line(EMPTY) + line(GOOD))


def json_array(path):
    path.write_text(json.dumps([GOOD, EMPTY, GOOD], indent=1))


def parquet(path):
    datasets.Dataset.from_list([GOOD, EMPTY, GOOD]).to_parquet(str(path))


@pytest.mark.parametrize("write, name, row", [(jsonl_with_blank_lines, "d.jsonl", "line 4"),
                                              (json_lines_in_a_json_file, "d.json", "line 3"),
                                              (json_array, "d.json", "element 1"),
                                              (parquet, "d.parquet", "row 1")])
def test_a_bad_row_is_named_as_its_file_numbers_it(tmp_path, tok, write, name, row):
    path = tmp_path / name
    write(path)
    assert len(load_preference_dataset(path)) == 3  # `datasets` skips blank lines
    pairs, report = tokenize(path, tok)
    assert [p.row for p in pairs] == [0, 2]  # the dataset's own indices, which the later stages keep
    assert report.dropped_rows == {"empty_response": [row]}
    assert f"empty_response 1 ({row})" in report.summary()
    with pytest.raises(ValueError, match=rf"{name} {row}: chosen is empty \(empty_response; strict=True\)"):
        tokenize(path, tok, strict=True)


def test_a_column_that_changes_type_names_its_line(tmp_path):
    # A blank line makes `datasets` fail on the type change ("Expected object or value", naming nothing).
    path = tmp_path / "t.jsonl"
    path.write_text(line(GOOD) * 2 + "\n" + line(GOOD) + line({**GOOD, "chosen": {"a": 1}}))
    with pytest.raises(ValueError, match=r"t.jsonl: line 5: 'chosen' is an object, but line 1 has a string; "
                                         "every row must use the same format"):
        load_preference_dataset(path)


def test_a_type_change_that_datasets_reads_is_a_bad_row_named_by_its_line(tmp_path, tok):
    """Recent `datasets` reads a column of mixed types as JSON values (older ones fail, and the load names the line)."""
    path = tmp_path / "t.jsonl"
    path.write_text(line(GOOD) * 3 + line({**GOOD, "chosen": ["a list"]}))
    with pytest.raises(ValueError, match=r"t.jsonl:? line 4: '?chosen'? (is an array|must be a string)"):
        tokenize(path, tok, strict=True)


@pytest.mark.parametrize("text, match", [
    (line(GOOD) + "\n" + '{"prompt": "a", oops}\n', r"line 3 is not valid JSON \(Expecting property name .* at "
                                                    r"column 17\); each line must hold one row, a JSON object"),
    (line(GOOD) * 2 + '["a", "b"]\n', r"line 3 is an array, not a row; every row must be a JSON object"),
])
def test_a_line_that_is_no_json_object_is_named(tmp_path, text, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"bad.jsonl: {match}"):
        load_preference_dataset(path)


def test_a_json_array_that_is_not_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD)[:-1] + ",]\n]")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON at line 3, column \d+ .*one JSON array of rows"):
        load_preference_dataset(path)


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.json"])
def test_a_byte_that_is_not_utf8_is_named_by_line_and_offset(tmp_path, name):
    first = line(GOOD).encode()
    bad = '{"prompt": "Review a café.", "chosen": "Good.", "rejected": "Bad."}\n'.encode("latin-1")
    path = tmp_path / name
    path.write_bytes(first + b"\n" + bad if name.endswith(".jsonl") else b"[" + first + b",\n" + bad[:-1] + b"]")
    offset = path.read_bytes().index(b"\xe9")
    with pytest.raises(ValueError, match=rf"{name}: line 3 is not UTF-8 \(byte 0xe9 at offset {offset} of the file\); "
                                         "the file must be UTF-8 encoded: convert it"):
        load_preference_dataset(path)


def conversation(chosen):
    return {"prompt": [user("Review a zoo.")], "chosen": chosen, "rejected": [assistant("Dirty cages.")]}


def test_a_response_that_is_no_assistant_turn_is_a_bad_row(tmp_path, tok):
    assert "- ``bad_role``:" in pairs_module.__doc__  # a documented reason
    path = tmp_path / "r.jsonl"
    path.write_text(line(conversation([assistant("Great.")])) + line(conversation([user("Great.")]))
                    + line(conversation([user("Well?"), assistant("Great.")])) + line(conversation([assistant("Ok.")])))
    pairs, report = tokenize(path, tok)
    assert [p.row for p in pairs] == [0, 3]
    assert report.dropped == {"bad_role": 2} and report.dropped_rows == {"bad_role": ["line 2", "line 3"]}
    with pytest.raises(ValueError, match=r"r.jsonl line 2: chosen must start with an assistant turn \(the model's "
                                         r"reply\), got a 'user' turn \(bad_role; strict=True\)"):
        tokenize(path, tok, strict=True)


ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
               "{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")


def with_template(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def test_messages_the_template_refuses_are_a_bad_row(tmp_path, tok):
    path = tmp_path / "r.jsonl"
    rows = [conversation([assistant("Great.")]), {**conversation([assistant("Great.")]),
                                                  "prompt": [user("Hi."), user("Review a zoo.")]}]
    path.write_text("".join(map(line, rows)))
    pairs, report = tokenize(path, with_template(tok, ALTERNATING))
    assert [p.row for p in pairs] == [0] and report.dropped_rows == {"bad_role": ["line 2"]}
    with pytest.raises(ValueError, match=r"r.jsonl line 2: the tokenizer's chat template refuses these messages: "
                                         r"Conversation roles must alternate .*\(bad_role; strict=True\)"):
        tokenize(path, with_template(tok, ALTERNATING), strict=True)


def test_a_template_that_never_works_is_an_error_not_bad_rows(tmp_path, tok):
    path = tmp_path / "r.jsonl"
    path.write_text(line(conversation([assistant("Great.")])))
    with pytest.raises(TemplateSyntaxError):
        tokenize(path, with_template(tok, "{% for m in messages %}"))
    # Assistant turns rendered unlike the generation prompt: the response cannot be cut from the prompt's text.
    renamed = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<bot>' }}{% endif %}")
    with pytest.raises(ValueError, match=r"r.jsonl line 1: the tokenizer's chat template does not render prompt \+ "
                                         r"response as the prompt's text .*use a tokenizer whose template does"):
        tokenize(path, with_template(tok, renamed))
