"""A task reward for the implicit-prompt example (``eval.reward=examples.implicit.reward:on_topic``): how much of
the last request a response takes up, a stand-in for a reward model that needs no download."""

import re

WORD = re.compile(r"[a-z]+")
# Words too common to show that a response is about the request.
COMMON = frozenset("a an the to do i how my it of and or in on for you your is are what can".split())


def _words(text: str) -> set[str]:
    return set(WORD.findall(text.lower())) - COMMON


def on_topic(prompts: list, responses: list[str]) -> list[float]:
    """Per response, the share of the words of the prompt's last human request that it uses, in [0, 1]."""
    scores = []
    for prompt, response in zip(prompts, responses):
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        request = _words(text.rsplit("Human:", 1)[-1])
        scores.append(len(request & _words(response)) / max(len(request), 1))
    return scores
