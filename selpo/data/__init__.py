"""Preference data: loading local files, validating and tokenizing rows, laying out batches for the body and the ops."""

from .batch import BatchSchedule, PairBatch, collate_pairs, collate_ranked, seeded_subset
from .load import default_data_path, load_preference_dataset
from .packing import LAYOUTS, attention_entries, body_tokens
from .pairs import DataReport, TokenizedPair, TokenizedRanking, encode_prompt, render_prompt, tokenize_pairs

__all__ = ["LAYOUTS", "BatchSchedule", "DataReport", "PairBatch", "TokenizedPair", "TokenizedRanking",
           "attention_entries", "body_tokens", "collate_pairs", "collate_ranked", "default_data_path", "encode_prompt",
           "load_preference_dataset", "render_prompt", "seeded_subset", "tokenize_pairs"]
