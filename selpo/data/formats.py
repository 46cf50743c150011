"""TRL's other preference layouts, mapped onto explicit ``prompt``/``chosen``/``rejected`` pairs.

- **Implicit prompt** (only ``chosen`` and ``rejected``, each a whole dialogue that starts with the shared
  prompt, as in the human-preference dialogue sets): the prompt is the longest common prefix of the two.
  Strings: the prefix is cut back to the end of the last prompt turn marker it holds (``PROMPT_MARKERS``,
  e.g. ``"\\n\\nAssistant:"``), so the response is the whole last turn; without a marker it is cut back to
  the last whitespace, so no word is split (TRL's ``extract_prompt`` steps back only over a space just
  before the first difference and may split a word). Message lists: the shared leading messages, cut back
  so that the prompt ends on a non-assistant turn. A row whose two sides share nothing is a bad row
  (``no_shared_prompt``).
- **Unpaired** (``prompt``, ``completion``, boolean ``label``: TRL's unpaired preference format, strings or
  messages): within each prompt, in data order, the k-th desirable completion is paired with the k-th
  undesirable one; completions left without a partner are counted, not used. Pair i's source rows are kept
  in ``source_rows`` so errors can name them. TRL's unpaired format always has its prompt column, in the
  standard and the conversational form alike (its docs convert implicit-prompt pairs to unpaired rows only
  after ``extract_prompt``), so there is no prompt to extract: data with ``completion`` or ``label`` but
  without ``chosen``/``rejected`` must have all three columns, and the two pairing keys, prompt and label,
  must be set in every row; otherwise an error names the file, the row (as the file numbers it: "line n" of
  a JSON Lines file, see ``selpo.data.pairs``) and the column (a dialogue with a label, ``messages`` +
  ``label``, is not a preference format). A bad completion is a bad row of its pair (counted, see
  ``selpo.data.pairs``).
"""

from __future__ import annotations

import json

from .load import row_names

PROMPT_MARKERS = ("\n\nAssistant:",)
UNPAIRED_COLUMNS = ("prompt", "completion", "label")


class NoSharedPrompt(ValueError):
    """The chosen and rejected sides of an implicit-prompt row share no prompt."""


def split_implicit(chosen, rejected):
    """(prompt, chosen response, rejected response) of an implicit-prompt row (rules in the module docstring).

    Both sides must have the same type (str or list of messages), checked by the caller.
    """
    if isinstance(chosen, str):
        end = _common_prefix_length(chosen, rejected)
        shared = chosen[:end]
        marked = [shared.rfind(m) + len(m) for m in PROMPT_MARKERS if m in shared]
        if marked:
            end = max(marked)
        elif end < min(len(chosen), len(rejected)):  # the sides differ inside the text: keep whole words
            end = max(shared.rfind(" "), shared.rfind("\n"))
        if end <= 0 or not shared[:end].strip():
            raise NoSharedPrompt("chosen and rejected share no prompt (no common leading text)")
        return chosen[:end], chosen[end:], rejected[end:]
    end = _common_prefix_length(chosen, rejected)
    while end and isinstance(chosen[end - 1], dict) and chosen[end - 1].get("role") == "assistant":
        end -= 1
    if end == 0:
        raise NoSharedPrompt("chosen and rejected share no leading non-assistant message")
    return chosen[:end], chosen[end:], rejected[end:]


def _common_prefix_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def is_unpaired(columns) -> bool:
    """Whether data with these columns is meant as unpaired rows: a completion or a label, no chosen/rejected."""
    return any(c in columns for c in UNPAIRED_COLUMNS[1:]) and not any(c in columns for c in ("chosen", "rejected"))


def pair_unpaired(dataset, source: str):
    """(a ``datasets.Dataset`` of prompt/chosen/rejected/source_rows pairs, rows left without a partner).

    ``source_rows`` holds dataset indices. A missing column, a missing prompt or a ``label`` that is not a bool
    raises, naming the source and the row as the file numbers it (``source``: the file the dataset was loaded
    from, or any label).
    """
    import datasets

    name = row_names(source)
    missing = [c for c in UNPAIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{source} {name(0)} (and every row): missing column(s) {missing}; unpaired preference data "
                         f"needs {list(UNPAIRED_COLUMNS)}, found {dataset.column_names}. TRL's unpaired format has "
                         "no implicit-prompt form: give each row its prompt (for a dialogue, the turns before the "
                         "last assistant reply) and, as completion, that reply")
    groups: dict[str, tuple[list, list]] = {}
    prompts = {}
    for i, row in enumerate(dataset.select_columns(list(UNPAIRED_COLUMNS))):
        if row["prompt"] is None:
            raise ValueError(f"{source} {name(i)}: missing 'prompt'; an unpaired row is paired by its prompt, which "
                             "TRL's unpaired format gives in every row")
        if not isinstance(row["label"], bool):
            raise ValueError(f"{source} {name(i)}: label must be true (desirable) or false, got {row['label']!r}")
        key = json.dumps(row["prompt"], sort_keys=True)
        prompts.setdefault(key, row["prompt"])
        groups.setdefault(key, ([], []))[0 if row["label"] else 1].append((i, row["completion"]))
    pairs, left = [], 0
    for key, (good, bad) in groups.items():
        left += abs(len(good) - len(bad))
        for (i, chosen), (j, rejected) in zip(good, bad):
            pairs.append({"prompt": prompts[key], "chosen": chosen, "rejected": rejected, "source_rows": [i, j]})
    pairs.sort(key=lambda p: min(p["source_rows"]))
    if not pairs:
        raise ValueError(f"{source}: unpaired data with no prompt that has both a desirable and an undesirable "
                         "completion")
    return datasets.Dataset.from_list(pairs), left


def row_prompt(row: dict):
    """The prompt of a row in the explicit or the implicit format (None when it has none to extract)."""
    if "prompt" in row:
        return row["prompt"]
    try:
        return split_implicit(row["chosen"], row["rejected"])[0]
    except (NoSharedPrompt, TypeError):
        return None
