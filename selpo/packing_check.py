"""Whether a model's body can take a packed or shared row (``selpo.data.packing``): checked on a probe, not assumed.

Recurrent and state-space layers (RecurrentGemma, xLSTM, Falcon-H1's and GraniteMoeHybrid's Mamba layers) carry
state from one segment of a row into the next, and a model whose attention does not go through transformers'
``AttentionInterface``, or asks for a mask the segments cannot follow, never sees them: such a model must keep
the padded layout. ``packing_check`` runs two pairs of seeded random ids (uneven prompts and responses, one of a
single token) both ways and compares the response log-probs, computed as the stages do (``response_states``,
``linear_logprobs``); for a model without a language-model head (guidance's token reward model), the hidden
states at the response positions. ``layout_for`` runs it once per model and tells a stage which layout to use.
"""

from __future__ import annotations

import torch

from .body import LAYOUT, TALLY, body_states
from .data import TokenizedPair, collate_pairs
from .data.packing import PACKED, PADDED, SHARED
from .head import VERIFY_ATOL, VERIFY_EPS_FACTOR, VERIFY_SEED
from .kernels import linear_logprobs
from .logprobs import response_states

# (prompt, chosen, rejected) lengths of the probe's pairs.
PROBE = ((7, 4, 9), (3, 6, 1))


@torch.no_grad()
def packing_check(model, layout: str = SHARED) -> tuple[bool, str]:
    """(ok, reason): whether ``model``'s response log-probs (hidden states, without a language-model head) in
    ``layout`` (``"shared"`` or ``"packed"``) equal the padded layout's on the probe, in the model's dtype, outside
    autocast, in eval mode, within ``verify_head``'s tolerance ``VERIFY_ATOL + VERIFY_EPS_FACTOR * eps * max|value|``.
    A layout that raises is not ok, and the reason says why; the caller then keeps the padded layout."""
    if layout not in (PACKED, SHARED):
        raise ValueError(f"layout must be {PACKED!r} or {SHARED!r}, got {layout!r}")
    weight = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    vocab = weight.shape[0] if not _has_lm_head(model) else min(weight.shape[0], head.weight.shape[0])
    generator = torch.Generator().manual_seed(VERIFY_SEED)
    pairs = [TokenizedPair(*(torch.randint(vocab, (n,), generator=generator).tolist() for n in lengths), row=i)
             for i, lengths in enumerate(PROBE)]
    name = f"{type(model).__name__} (model_type {model.config.model_type!r})"
    what = "log-probs" if _has_lm_head(model) else "hidden states"
    was_training, counted = model.training, (TALLY.computed, TALLY.padded, set(TALLY.layouts))
    model.eval()
    try:
        with torch.autocast(weight.device.type, enabled=False):
            expected = _outputs(model, collate_pairs(pairs, 0).to(weight.device))
            try:
                got = _outputs(model, collate_pairs(pairs, 0, layout).to(weight.device))
            except Exception as e:  # whatever stops the layout is the reason to keep the padded one
                return False, f"{name}: the {layout} layout fails: {type(e).__name__}: {e}"
    finally:
        model.train(was_training)
        TALLY.computed, TALLY.padded, TALLY.layouts = counted  # the probe is no work of the stage's
    diff = float((got - expected).abs().max())
    tol = VERIFY_ATOL + VERIFY_EPS_FACTOR * torch.finfo(weight.dtype).eps * float(expected.abs().max())
    if not diff <= tol:
        return False, (f"{name}: the {layout} layout's {what} differ from the padded layout's by {diff:.3g} "
                       f"(tolerance {tol:.3g}): its body carries state across segments (recurrent or state-space "
                       "layers) or its attention does not follow them")
    return True, f"{name}: the {layout} layout's {what} equal the padded layout's within {diff:.3g}"


def _has_lm_head(model) -> bool:
    return isinstance(model.get_output_embeddings(), torch.nn.Linear)


def _outputs(model, batch) -> torch.Tensor:
    """The probe's outputs: response log-probs, or the response hidden states of a model without an LM head."""
    if not _has_lm_head(model):
        return body_states(model, batch)[batch.positions].float()
    hidden, head = response_states(model, batch)
    return linear_logprobs(hidden, head.weight, batch.targets, backend="torch", **head.op_kwargs()).float()


def choose_layout(model, wanted: str) -> str | None:
    """Sets the layout ``model``'s body runs in (``selpo.body.layout_of``): ``wanted`` when it is ``"padded"`` or
    ``packing_check`` passes, else ``"padded"``; returns a line saying why it fell back, or None."""
    ok, reason = (True, None) if wanted == PADDED else packing_check(model, wanted)
    model.__dict__[LAYOUT] = wanted if ok else PADDED
    return None if ok else f"the padded layout instead of {wanted}: {reason}"
