"""VADER as the default task's ground truth: its compound score is the reward, and since VADER is a word
lexicon, the key tokens of a response are known: the tokens of the words it finds in its lexicon."""

from __future__ import annotations

import re
import string
from functools import lru_cache
from itertools import pairwise


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_lexicon() -> dict[str, float]:
    """VADER's lexicon: lower-case word (or emoticon) -> valence in [-4, 4]."""
    return _analyzer().lexicon


def vader_reward(texts: list[str]) -> list[float]:
    """The ground-truth reward of each text: VADER's compound score in [-1, 1] (positive is better)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    return [_analyzer().polarity_scores(t)["compound"] for t in texts]


def sentiment_word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of ``text`` that are in VADER's lexicon, split as VADER splits them.

    VADER cuts on whitespace and strips the punctuation around a word unless fewer than three characters
    would be left (then it keeps the whole, so emoticons like ":)" survive); it looks words up lower-cased.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    lexicon = sentiment_lexicon()
    spans = []
    for m in re.finditer(r"\S+", text):
        word = m.group()
        start, end = m.start(), m.end()
        stripped = word.strip(string.punctuation)
        if len(stripped) > 2:
            start += len(word) - len(word.lstrip(string.punctuation))
            end -= len(word) - len(word.rstrip(string.punctuation))
            word = stripped
        if word.lower() in lexicon:
            spans.append((start, end))
    return spans


def sentiment_word_mask(text: str, offsets: list[tuple[int, int]]) -> list[bool]:
    """Per token (given by its character span in ``text``): does it overlap a sentiment word?"""
    marked = bytearray(len(text))
    for start, end in sentiment_word_spans(text):
        marked[start:end] = b"\x01" * (end - start)
    return [any(marked[start:end]) for start, end in offsets]


def key_token_mask(tokenizer, token_ids: list[int]) -> list[bool]:
    """Ground-truth key tokens of a response given as token ids (e.g. a response of a ``TokenizedPair``).

    Each token's span is found by decoding growing prefixes, which works for any tokenizer and for ids no
    tokenizer would produce from text (samples); a token that decodes to part of a multi-byte character
    may shift the span by one character, which no ASCII lexicon word notices.
    """
    pieces = [0]
    for k in range(1, len(token_ids) + 1):
        pieces.append(max(pieces[-1], len(_decode(tokenizer, token_ids[:k]))))
    text = _decode(tokenizer, token_ids)
    return sentiment_word_mask(text, list(pairwise(pieces)))


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
