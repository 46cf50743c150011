"""The work the 2-process test runs both in 2 processes and in 1: DPO training, then sharded scoring."""

from selpo.batches import Example
from selpo.config import LoopConfig
from selpo.data import load_preference_dataset, tokenize_pairs
from selpo.methods import DPO, with_reference_logps
from selpo.models import load_causal_lm
from selpo.stages.score import score_pairs
from selpo.trainer import train

# Global batch 4: one process accumulates 2 micro-batches of 2, two processes take one each.
LOOP = LoopConfig(batch_size=4, micro_batch_size=2, lr=1e-3, max_steps=3, save_every=0, warmup_ratio=0.0)


def run_case(accelerator, model_dir, other_dir, data_file, out_dir):
    """Returns the trained weights, the reference log-probs and, per pair, (scores, masks) of the model in
    ``other_dir`` against the one in ``model_dir`` (fixed models, so scoring is compared on its own)."""
    model, tokenizer = load_causal_lm(model_dir)
    pairs, _ = tokenize_pairs(load_preference_dataset(data_file), tokenizer, max_length=48, max_prompt_length=24)
    pairs = pairs[:12]
    examples = with_reference_logps(accelerator, model, [Example(p) for p in pairs], pad_id=tokenizer.pad_token_id,
                                    batch_size=3, backend="torch")
    trained = train(accelerator, model, tokenizer, DPO(beta=0.5, backend="torch"), examples, LOOP, out_dir, seed=0)
    reference, _ = load_causal_lm(model_dir)
    oracle, _ = load_causal_lm(other_dir)
    scored = score_pairs(accelerator, oracle, reference, pairs, pad_id=tokenizer.pad_token_id, batch_size=5,
                         chosen_ratio=0.3, rejected_ratio=0.5, backend="torch")
    return {"weights": {k: v.detach().clone() for k, v in trained.state_dict().items()},
            "ref_logps": [e.extras["ref_logps"] for e in examples], "scored": scored}
