"""Every op call of the trainer passes the model's head (``selpo.head``): the methods' losses, ``pair_logps`` and
the score stage's rewards equal what the model's own full logits give, on tiny models whose heads soft-cap
(Gemma 2) or scale (Cohere) their logits."""

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from selpo.batches import Example, collate, split_packed
from selpo.config import RunConfig
from selpo.data import TokenizedPair, collate_pairs
from selpo.kernels import dpo_loss, sepo_loss, simpo_loss, topk_mask, weighted_nll
from selpo.logprobs import pair_logps
from selpo.methods import DPO, RewardWeightedLikelihood, SelectiveDPO, SePO, SimPO, selection_scores
from selpo.stages.score import score_pairs
from selpo.trainer import make_accelerator

VOCAB = 256
HEADS = {"gemma2": dict(final_logit_softcapping=2.0, head_dim=16), "cohere": dict(logit_scale=0.0625)}


def tiny(model_type: str, seed: int = 0):
    """A tiny random model with a transformed head, its weights x3 so that the transform bends its logits."""
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=128, **HEADS[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


def random_pairs(n: int = 4) -> list[TokenizedPair]:
    gen = torch.Generator().manual_seed(0)

    def ids(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (), generator=gen)),), generator=gen).tolist()

    return [TokenizedPair(ids(2, 6), ids(2, 7), ids(2, 7), row=i) for i in range(n)]


def own_logps(model, batch) -> torch.Tensor:
    """[N] float32 log-probs of the response tokens from the model's own full logits: the reference."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = logits.flatten(0, 1)[batch.positions].float().log_softmax(-1)
    return logp.gather(1, batch.targets[:, None])[:, 0]


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator(RunConfig(device="cpu"))


@pytest.mark.parametrize("model_type", HEADS)
def test_pair_logps_are_the_models_own(model_type, accelerator):
    model, pairs = tiny(model_type), random_pairs()
    batch = collate_pairs(pairs, 0)
    expected = split_packed(own_logps(model, batch), batch.cu_seqlens)
    got = pair_logps(accelerator, model, pairs, pad_id=0, batch_size=3, backend="torch")
    for values, want in zip(got, expected):
        for value, w in zip(values, want):
            torch.testing.assert_close(value, w, atol=1e-5, rtol=0)


def test_score_pairs_are_the_difference_of_the_models_own(accelerator):
    oracle, reference, pairs = tiny("gemma2"), tiny("cohere", seed=1), random_pairs()
    batch = collate_pairs(pairs, 0)
    expected = split_packed(own_logps(oracle, batch) - own_logps(reference, batch), batch.cu_seqlens)
    scored = score_pairs(accelerator, oracle, reference, pairs, pad_id=0, batch_size=4, chosen_ratio=0.5,
                         rejected_ratio=0.5, backend="torch")
    for (scores, _), want in zip(scored, expected):
        for value, w in zip(scores, want):
            torch.testing.assert_close(value, w, atol=2e-5, rtol=0)


def examples(pairs: list[TokenizedPair]) -> list[Example]:
    """The pairs with every method's extras: a SePO mask, reference log-probs, guidance weights."""
    gen = torch.Generator().manual_seed(1)

    def extras(n: int) -> dict:
        return {"mask": torch.arange(n) % 2 == 0, "ref_logps": -3 * torch.rand(n, generator=gen),
                "weights": torch.rand(n, generator=gen)}

    chosen, rejected = zip(*[(extras(len(p.chosen_ids)), extras(len(p.rejected_ids))) for p in pairs])
    return [Example(p, {k: (c[k], r[k]) for k in c}) for p, c, r in zip(pairs, chosen, rejected)]


def selective_dpo_loss(logps, batch):
    cu, ref = batch.pairs.cu_seqlens, batch.extras["ref_logps"]
    mask = topk_mask(selection_scores(logps, ref, cu), cu, 0.5, largest=True, backend="naive")
    return dpo_loss(logps, ref, cu, beta=0.5, mask=mask, backend="naive")


METHODS = {  # name -> (the method, its loss from the reference log-probs)
    "sepo": (SePO(gamma=2.0, margin=0.1, backend="torch"), lambda lp, b: sepo_loss(
        lp, b.extras["mask"], b.pairs.cu_seqlens, gamma=2.0, margin=0.1, backend="naive")),
    "dpo": (DPO(beta=0.5, backend="torch"), lambda lp, b: dpo_loss(
        lp, b.extras["ref_logps"], b.pairs.cu_seqlens, beta=0.5, backend="naive")),
    "simpo": (SimPO(beta=2.0, gamma=0.5, backend="torch"), lambda lp, b: simpo_loss(
        lp, b.pairs.cu_seqlens, beta=2.0, gamma=0.5, backend="naive")),
    "selective_dpo": (SelectiveDPO(beta=0.5, ratio=0.5, backend="torch"), selective_dpo_loss),
    "guidance": (RewardWeightedLikelihood(backend="torch"), lambda lp, b: weighted_nll(
        lp, b.extras["weights"], b.pairs.cu_seqlens, backend="naive")),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model_type", HEADS)
@pytest.mark.parametrize("name", METHODS)
def test_method_losses_are_the_models_own(name, model_type, backend):
    model, (method, reference_loss) = tiny(model_type), METHODS[name]
    batch = collate(examples(random_pairs()), 0)
    loss, _ = dataclasses.replace(method, backend=backend).loss(model, batch)
    expected, _ = reference_loss(own_logps(model, batch.pairs), batch)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
