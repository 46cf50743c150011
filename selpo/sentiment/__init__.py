"""The default task, controlled-sentiment generation (as in the DPO paper's IMDb experiment): review
prompts, responses from the default model, VADER's compound score as the ground-truth reward, and
VADER's lexicon words as the ground-truth key tokens."""

from .generate import generate_default_dataset
from .prompts import review_prompts
from .vader import key_token_mask, sentiment_lexicon, sentiment_word_mask, sentiment_word_spans, vader_reward

__all__ = ["generate_default_dataset", "key_token_mask", "review_prompts",
           "sentiment_lexicon", "sentiment_word_mask", "sentiment_word_spans", "vader_reward"]
