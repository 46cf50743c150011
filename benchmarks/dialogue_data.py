"""A seeded, offline preference set shaped like public multi-turn human-preference data, for timing the token
layouts (``selpo.data.packing``) where they matter: prompts that are most of the tokens, responses of very
different lengths. Nothing is downloaded; only the token counts and the dialogue structure are realistic.

Shape (``DialogueShape``; each dialogue drawn from its own seeded generator):

- ``turns``: the user messages of a prompt, uniform in 2..5; the prompt alternates user and assistant messages
  and ends on a user message, so it holds ``turns - 1`` earlier assistant replies (then the chat template's
  generation prompt; SmolLM2's template also puts its default system message first);
- a user message: log-uniform in 3..50 words; an earlier assistant reply and each response: log-uniform in
  10..300 tokens, the response's end-of-sequence token included (log-uniform: about a third under 30 tokens and
  an eighth over 200, a long right tail as in the public sets);
- caps as the issue's measurement: at most 768 prompt tokens and 1024 tokens of prompt + response; a dialogue
  over either loses its earliest exchange (user message and assistant reply) until it fits, so it stays a
  dialogue ending on a user message and no response is cut.

The text is made of words that are one token each (``one_token_words``) and the prompt is rendered by the
tokenizer's chat template (``selpo.data.encode_prompt``, as selpo tokenizes conversational rows), so a trainer
that tokenizes text (TRL) gets the same ids from the decoded pair. ``describe`` gives the statistics the tests
check and the benchmark reports, the prompt share counted over all the set's tokens: prompt / (prompt + chosen
+ rejected).

    python -m benchmarks.dialogue_data [--pairs 800] [--seed 0] [--shape half]   # statistics, SmolLM2's tokenizer
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
from dataclasses import dataclass

from selpo.data import TokenizedPair, encode_prompt


@dataclass(frozen=True)
class DialogueShape:
    """Ranges (inclusive) of the draws and the caps; the module docstring says why these."""

    turns: tuple[int, int] = (2, 5)
    user_words: tuple[int, int] = (3, 50)
    reply_tokens: tuple[int, int] = (10, 300)
    max_prompt: int = 768
    max_length: int = 1024


# The 2-core CPU's benchmark (benchmarks/training_step.py ``--dialogue half``), where a step on the full shape takes
# minutes: lengths and caps halved, the user messages shortened further so that the chat template's fixed tokens
# (role headers, SmolLM2's default system message) keep the prompt share within 60-70%.
SHAPES = {"full": DialogueShape(),
          "half": DialogueShape(user_words=(1, 15), reply_tokens=(5, 150), max_prompt=384, max_length=512)}


@dataclass(frozen=True)
class Dialogue:
    """One generated pair and the user turns its prompt kept."""

    pair: TokenizedPair
    turns: int


def one_token_words(tokenizer) -> list[int]:
    """Ids of the tokens that are a space and a lowercase word, and that the tokenizer gives back alone for that
    text: a text joined from such words tokenizes to exactly their ids (byte-level BPE splits words at spaces)."""
    words = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if re.fullmatch(r" [a-z]{2,}", text) and tokenizer.encode(text, add_special_tokens=False) == [i]:
            words.append(i)
    if len(words) < 100:
        raise RuntimeError(f"the tokenizer has {len(words)} one-token words; the generated pairs need at least 100")
    return words


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def dialogues(tokenizer, count: int, seed: int = 0, shape: DialogueShape = DialogueShape()) -> list[Dialogue]:
    """``count`` dialogues, the i-th from ``random.Random(seed * 1_000_003 + i)``: the same pairs for a seed
    whatever ``count`` is."""
    words, eos = one_token_words(tokenizer), tokenizer.eos_token_id
    made = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        turns = rng.randint(*shape.turns)
        messages = []
        for m in range(2 * turns - 1):  # user, assistant, ..., user
            role = ("user", "assistant")[m % 2]
            length = log_uniform(rng, *(shape.user_words if role == "user" else shape.reply_tokens))
            messages.append({"role": role, "content": tokenizer.decode(rng.choices(words, k=length))})
        chosen, rejected = ([*rng.choices(words, k=log_uniform(rng, *shape.reply_tokens) - 1), eos]
                            for _ in range(2))
        prompt = encode_prompt(tokenizer, messages)
        while len(prompt) > shape.max_prompt or len(prompt) + max(len(chosen), len(rejected)) > shape.max_length:
            if turns == shape.turns[0]:
                raise ValueError(f"dialogue {i}: {turns} turns do not fit the caps of {shape}")
            messages, turns = messages[2:], turns - 1
            prompt = encode_prompt(tokenizer, messages)
        made.append(Dialogue(TokenizedPair(prompt, chosen, rejected, row=i), turns))
    return made


def describe(made: list[Dialogue]) -> dict:
    """The set's statistics: prompt share of all tokens, turns per prompt, response and prompt lengths."""
    prompts = [len(d.pair.prompt_ids) for d in made]
    responses = sorted(len(r) for d in made for r in d.pair.responses)
    total = sum(prompts) + sum(responses)
    deciles = statistics.quantiles(responses, n=10)
    return {"pairs": len(made), "prompt_share": sum(prompts) / total,
            "turns": {t: sum(d.turns == t for d in made) for t in sorted({d.turns for d in made})},
            "prompt_tokens": {"min": min(prompts), "median": statistics.median(prompts), "max": max(prompts)},
            "response_tokens": {"min": responses[0], "p10": deciles[0], "median": statistics.median(responses),
                                "p90": deciles[-1], "max": responses[-1]},
            "responses_under_30": sum(n < 30 for n in responses) / len(responses),
            "responses_over_200": sum(n > 200 for n in responses) / len(responses),
            "longest_sequence": max(p + len(r) for p, d in zip(prompts, made) for r in d.pair.responses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=SHAPES, default="full")
    args = parser.parse_args()
    from selpo.models import load_tokenizer

    made = dialogues(load_tokenizer("default"), args.pairs, args.seed, SHAPES[args.shape])
    print(json.dumps(describe(made), indent=1))


if __name__ == "__main__":
    main()
