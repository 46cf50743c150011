"""Preference rows to token ids: chat template, validation of every row, truncation, and the report.

Formats (TRL's): ``prompt``, ``chosen`` and ``rejected`` as strings, or as lists of ``{"role", "content"}``
messages (the prompt's turns; the responses' assistant turns); or only ``chosen`` and ``rejected``, the
prompt implicit in them (extracted by ``selpo.data.formats.split_implicit``). Unpaired data is paired first
(``selpo.data.formats.pair_unpaired``). With a chat template, a string prompt is
one user turn and a string response one assistant turn; the response is the text the template adds after
the prompt's generation prompt (so it ends with the template's end-of-turn token). Without a chat template
the prompt is plain text (with the tokenizer's special tokens, e.g. BOS) and each response is plain text
followed by EOS; conversational rows then raise.

Validation: a missing column raises at once (``ValueError`` naming the source and the columns). A bad row
is skipped and counted under its reason, or raises naming the source and the row with ``strict=True``:

- ``missing``: prompt, chosen or rejected is null (or absent from that JSON row);
- ``no_shared_prompt``: an implicit-prompt row whose chosen and rejected share no prompt;
- ``bad_type``: not a string, or not a list of messages with string role and content, or a row that
  mixes the two formats;
- ``bad_role``: a response (a list of messages) that does not start with an assistant turn, or messages
  the chat template refuses (it raises, e.g. for turns that do not alternate). A template that renders the
  row but not as the prompt's text followed by the response is the tokenizer's fault and raises, naming the
  row where it showed;
- ``empty_response``: chosen or rejected is empty or only whitespace;
- ``empty_prompt``: the prompt gives no token (plain text without BOS): the first response token needs a
  token before it to be predicted from;
- ``too_long``: the prompt leaves no room for a single response token under ``max_length``.

Truncation: the prompt is cut from the left to its last ``max_prompt_length`` tokens (None: never cut),
then each response is cut from the right so that prompt + response <= ``max_length``; a cut response keeps
no end-of-sequence token (``TokenizedPair.cut`` records it; SePO's released rule puts one back, see
``selpo.stages.score``). Prompt tokens never enter a loss: only response tokens are targets.

Row numbers: ``TokenizedPair.row`` is the row's index in the dataset (from 0, as in ``datasets``), which the
later stages store. Every message a user reads (errors, the report's dropped rows and its summary) names the
row as its file has it instead (``selpo.data.load.row_names``): "line n" of a JSON Lines file (1-based, as
editors number lines, blank lines included), "element i" of a JSON array (0-based, as JSON indexes arrays),
and "row i" of a Parquet file, a saved or cached dataset or data from no file (its index, as ``datasets``
numbers it). A pair formed from unpaired data is "pair i (line a and line b)": its index among the pairs,
then its two source rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

from .formats import NoSharedPrompt, split_implicit
from .load import row_names

COLUMNS = ("prompt", "chosen", "rejected")
# How many dropped rows the report lists by number, per reason.
LISTED_ROWS = 5


@dataclass
class TokenizedPair:
    """One preference pair as token ids; ``row`` is its index in the source dataset."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int
    # Whether (chosen, rejected) was cut to fit max_length (and so ends without its end-of-sequence token).
    cut: tuple[bool, bool] = (False, False)

    @property
    def responses(self) -> tuple[list[int], list[int]]:
        """The responses best first: a pair is a ranking of two."""
        return self.chosen_ids, self.rejected_ids


@dataclass
class TokenizedRanking:
    """K responses to one prompt, best first (e.g. samples ranked by the task's reward; K = 1: just the
    preferred response, for likelihood training); ``row`` identifies the prompt."""

    prompt_ids: list[int]
    responses: list[list[int]]
    row: int


@dataclass
class DataReport:
    """What happened to a dataset's rows: printed and saved by the stages before any training."""

    source: str
    rows: int = 0
    kept: int = 0
    # Kept rows whose prompt or a response was shortened.
    truncated: int = 0
    # Skipped rows per reason (the reasons the module docstring lists), and the first LISTED_ROWS of them per
    # reason, named as the file names them (e.g. "line 4", see the module docstring).
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_rows: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{self.source}: {self.rows} rows, {self.kept} kept ({self.truncated} truncated)"
        if self.dropped:
            parts = [f"{reason} {n} ({', '.join(self.dropped_rows[reason])}"
                     f"{', ...' if n > len(self.dropped_rows[reason]) else ''})" for reason, n in self.dropped.items()]
            text += f", {sum(self.dropped.values())} dropped: " + "; ".join(parts)
        return text

    def to_dict(self) -> dict:
        return asdict(self)

    def _drop(self, name: str, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        listed = self.dropped_rows.setdefault(reason, [])
        if len(listed) < LISTED_ROWS:
            listed.append(name)


class BadRow(ValueError):
    """A row that cannot be used, with its reason (one of those the module docstring lists)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The text a model is given before its response (with the chat template's generation prompt)."""
    if not has_chat_template(tokenizer):
        if not isinstance(prompt, str):
            raise ValueError("conversational data (lists of messages) needs a tokenizer with a chat template")
        return prompt
    return tokenizer.apply_chat_template(_messages(prompt, "user"), tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of ``render_prompt``; special tokens are added only where no chat template provides them."""
    return encode(tokenizer, [render_prompt(tokenizer, prompt)], prompt=True)[0]


def encode(tokenizer, texts: list[str], *, prompt: bool) -> list[list[int]]:
    """Token ids of rendered prompts or responses (a plain-text response gets EOS appended)."""
    chat = has_chat_template(tokenizer)
    ids = tokenizer(texts, add_special_tokens=prompt and not chat)["input_ids"] if texts else []
    if not prompt and not chat and tokenizer.eos_token_id is not None:
        ids = [x + [tokenizer.eos_token_id] for x in ids]
    return ids


def tokenize_pairs(dataset, tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                   source: str = "dataset", strict: bool = False) -> tuple[list[TokenizedPair], DataReport]:
    """Validates, renders, tokenizes and truncates every row (rules in this module's docstring).

    ``source`` names the data in messages: the file, folder or cached name ``dataset`` was loaded from (a
    file's rows are then named as the file numbers them), or any label. Returns the kept pairs and a
    ``DataReport``. Raises ``ValueError`` for a missing column, for a bad row when ``strict``, and when no row
    is left.
    """
    _check_lengths(max_length, max_prompt_length)
    columns = list(getattr(dataset, "column_names", None) or [])
    used = list(COLUMNS) if "prompt" in columns else list(COLUMNS[1:])  # no prompt column: an implicit prompt
    missing = [c for c in used if c not in columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; preference data needs {list(COLUMNS)}, or "
                         f"chosen and rejected that share their prompt, or prompt/completion/label (unpaired); "
                         f"found {columns}")
    report = DataReport(source=source, rows=len(dataset))
    where = _row_names(dataset, columns, source)
    rendered = []
    for i, row in enumerate(dataset.select_columns(used)):
        try:
            rendered.append((i, *_render_row(row, tokenizer)))
        except BadRow as bad:
            _reject(report, source, where(i), bad, strict)
        except ValueError as e:
            raise ValueError(f"{source} {where(i)}: {e}") from e
    prompts = encode(tokenizer, [r[1] for r in rendered], prompt=True)
    chosen = encode(tokenizer, [r[2] for r in rendered], prompt=False)
    rejected = encode(tokenizer, [r[3] for r in rendered], prompt=False)
    pairs = []
    for (i, *_), p, c, r in zip(rendered, prompts, chosen, rejected):
        try:
            pair = _truncate(TokenizedPair(p, c, r, i), max_length, max_prompt_length)
        except BadRow as bad:
            _reject(report, source, where(i), bad, strict)
            continue
        pairs.append(pair)
        report.truncated += pair.cut != (False, False) or len(pair.prompt_ids) < len(p)
    report.kept = len(pairs)
    if not pairs:
        raise ValueError(f"{source}: no usable row; {report.summary()}")
    return pairs, report


def _check_lengths(max_length, max_prompt_length):
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (a prompt token and a response token), got {max_length!r}")
    if max_prompt_length is not None and (isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int)
                                          or not 1 <= max_prompt_length <= max_length):
        raise ValueError(f"max_prompt_length must be None or an int in [1, max_length={max_length}], "
                         f"got {max_prompt_length!r}")


def _row_names(dataset, columns, source):
    """Row i's name in messages (module docstring): as ``source`` numbers it, or a pair's and its source rows'."""
    name = row_names(source)
    if "source_rows" not in columns:
        return name
    sources = dataset["source_rows"]
    return lambda i: f"pair {i} ({name(sources[i][0])} and {name(sources[i][1])})"


def _reject(report, source, name, bad, strict):
    if strict:
        raise ValueError(f"{source} {name}: {bad} ({bad.reason}; strict=True)") from None
    report._drop(name, bad.reason)


def _messages(value, role):
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _check_messages(column, value):
    if not isinstance(value, list):
        raise BadRow("bad_type", f"{column} must be a list of messages like the prompt, got {type(value).__name__}")
    for k, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow("bad_type", f"{column} message {k} must be a dict with string 'role' and 'content', got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _render_row(row, tokenizer):
    """(prompt text, chosen text, rejected text) of one row, or BadRow."""
    for column in row:
        if row[column] is None:
            raise BadRow("missing", f"{column} is missing (null)")
    if "prompt" not in row:
        row = _explicit(row)
    prompt = row["prompt"]
    conversational = isinstance(prompt, list)
    if conversational:
        prompt = _check_messages("prompt", prompt)
    elif not isinstance(prompt, str):
        raise BadRow("bad_type", f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    responses = []
    for column in ("chosen", "rejected"):
        value = row[column]
        if conversational:
            value = _check_messages(column, value)
            content = "".join(m["content"] for m in value)
        elif not isinstance(value, str):
            raise BadRow("bad_type", f"{column} must be a string like the prompt, got {type(value).__name__}")
        else:
            content = value
        if not content.strip():
            raise BadRow("empty_response", f"{column} is empty")
        if conversational and value[0]["role"] != "assistant":
            raise BadRow("bad_role", f"{column} must start with an assistant turn (the model's reply), got a "
                                     f"{value[0]['role']!r} turn")
        responses.append(value)
    if not has_chat_template(tokenizer):
        return render_prompt(tokenizer, prompt), *responses
    with _refusals_as_bad_rows():
        prompt_text = render_prompt(tokenizer, prompt)
        fulls = [tokenizer.apply_chat_template(_messages(prompt, "user") + _messages(value, "assistant"),
                                               tokenize=False) for value in responses]
    if not all(full.startswith(prompt_text) for full in fulls):
        raise ValueError("the tokenizer's chat template does not render prompt + response as the prompt's text "
                         "followed by the response, so the response tokens cannot be told apart; use a tokenizer "
                         "whose template does")
    return prompt_text, *(full[len(prompt_text):] for full in fulls)


@contextlib.contextmanager
def _refusals_as_bad_rows():
    """The chat template's refusal of a row's messages (its ``raise_exception``, e.g. for turns that do not
    alternate) as a bad row; a template that does not even compile still raises."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    try:
        yield
    except TemplateSyntaxError:
        raise
    except TemplateError as e:
        raise BadRow("bad_role", f"the tokenizer's chat template refuses these messages: {e}") from None


def _explicit(row):
    """An implicit-prompt row as prompt/chosen/rejected, or BadRow."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, str) and isinstance(rejected, str)
            or isinstance(chosen, list) and isinstance(rejected, list)):
        raise BadRow("bad_type", f"chosen and rejected must both be strings or both lists of messages, got "
                                 f"{type(chosen).__name__} and {type(rejected).__name__}")
    try:
        prompt, chosen, rejected = split_implicit(chosen, rejected)
    except NoSharedPrompt as e:
        raise BadRow("no_shared_prompt", str(e)) from None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _truncate(pair, max_length, max_prompt_length):
    """The pair truncated by the module's rule (``cut`` set), or BadRow."""
    if not pair.prompt_ids:
        raise BadRow("empty_prompt", "the prompt gives no token, so the first response token has nothing to follow")
    if not pair.chosen_ids or not pair.rejected_ids:
        raise BadRow("empty_response", "a response gives no token")
    if max_prompt_length is not None and len(pair.prompt_ids) > max_prompt_length:
        pair.prompt_ids = pair.prompt_ids[-max_prompt_length:]
    room = max_length - len(pair.prompt_ids)
    if room < 1:
        raise BadRow("too_long", f"the prompt has {len(pair.prompt_ids)} tokens, leaving no room for a response "
                                 f"under max_length={max_length}")
    pair.cut = (len(pair.chosen_ids) > room, len(pair.rejected_ids) > room)
    pair.chosen_ids, pair.rejected_ids = pair.chosen_ids[:room], pair.rejected_ids[:room]
    return pair
