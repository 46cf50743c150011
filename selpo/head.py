"""What the fused ops take from a causal LM: its last hidden states and its output head, the head read in one
place (``read_head``) with the scalar transforms the model's own forward applies to its logits, and a self-check
(``verify_head``) that selpo's log-probs equal the model's on a short batch.

Many architectures do not stop at ``hidden @ lm_head.T (+ bias)``: Gemma 2 soft-caps the logits, Cohere
multiplies them, Granite divides them. Reading those transforms anywhere but here would let one op call
silently compute other log-probs than the model; the self-check catches an architecture whose transform
selpo does not know, before any work is done on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .kernels import linear_logprobs

# model_type -> (config field, what the model's ForCausalLM forward does with it), read from the forwards of
# transformers 5.24's causal LMs. Keyed by model type, not by field name, because a field name does not say what
# it does: ``logits_scaling`` divides Granite's logits but multiplies HyperCLOVA X's, MPT's config carries a
# ``logit_scale`` its forward never applies, and Gemma 3's multimodal model ignores its text config's
# ``final_logit_softcapping``. Fields are read from ``config.get_text_config()`` (multimodal Gemma 3n and 4).
# Not scalar, hence not read (``verify_head`` rejects them): Inkling's vocabulary slice after its head,
# ModernBERT-decoder's and Electra's extra layers between the hidden states and the head.
SOFTCAP, MULTIPLIER, DIVISOR = "softcap", "multiplier", "divisor"
HEAD_TRANSFORMS: dict[str, tuple[str, str]] = {
    **{t: ("final_logit_softcapping", SOFTCAP) for t in (
        "gemma2", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified",
        "gemma4_unified_text", "vaultgemma", "nanochat", "beam", "inkling2_text")},
    "recurrent_gemma": ("logits_soft_cap", SOFTCAP),
    "xlstm": ("output_logit_soft_cap", SOFTCAP),
    **{t: ("logit_scale", MULTIPLIER) for t in ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text")},
    # MiniCPM3 divides the hidden states before a bias-free lm_head: the same as dividing the logits.
    **{t: ("logits_scaling", DIVISOR) for t in (
        "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared",
        "minicpm3")},
    "hyperclovax": ("logits_scaling", MULTIPLIER),
    "falcon_h1": ("lm_head_multiplier", MULTIPLIER),
}

VERIFY_TOKENS = 64  # a multiple of the chunk sizes of chunked recurrent models (xLSTM's 64)
VERIFY_SEED = 0
VERIFY_ATOL = 1e-3
VERIFY_EPS_FACTOR = 8


class HeadMismatchError(RuntimeError):
    """selpo's log-probs of a model differ from the model's own: its head does something ``read_head`` misses."""


@dataclass(frozen=True)
class LogitHead:
    """A model's logits as ``softcap_c(scale * (hidden @ weight.T + bias))``, ``softcap_c(z) = c * tanh(z / c)``.

    ``weight`` [V, D], ``bias`` [V] or None; ``scale`` > 0 (1.0: none); ``softcap`` c > 0 or None.
    """

    weight: torch.Tensor = field(repr=False)
    bias: torch.Tensor | None = field(repr=False)
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        if self.softcap is not None and not (isinstance(self.softcap, (int, float)) and self.softcap > 0):
            raise ValueError(f"softcap must be None or a number > 0, got {self.softcap!r}")

    @property
    def plain(self) -> bool:
        """True when the logits are exactly ``hidden @ weight.T``, all that ``token_scores`` computes."""
        return self.bias is None and self.scale == 1.0 and self.softcap is None

    def to(self, dtype: torch.dtype) -> LogitHead:
        """The same head with weight and bias cast to ``dtype`` (differentiably: gradients reach the originals)."""
        return replace(self, weight=self.weight.to(dtype), bias=None if self.bias is None else self.bias.to(dtype))

    def op_kwargs(self, temperature: float = 1.0) -> dict:
        """``bias``, ``softcap`` and ``temperature`` for the ops, which compute ``softcap_c'(x) / T'`` for
        ``x = hidden @ weight.T + bias``, so that they give ``log_softmax(softcap_c(scale * x) / temperature)``.

        The scale s folds exactly into the ops' arguments:
        ``softcap_c(s x) / T = c tanh(s x / c) / T = (c/s) tanh(x / (c/s)) / (T/s) = softcap_{c/s}(x) / (T/s)``,
        and without a soft-cap ``s x / T = x / (T/s)``. ``temperature`` stays the caller's (sampling or
        scoring) temperature on top of the model's head.
        """
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        softcap = None if self.softcap is None else self.softcap / self.scale
        return {"bias": self.bias, "softcap": softcap, "temperature": temperature / self.scale}


def read_head(model) -> LogitHead:
    """The output head of a transformers causal LM with the transform its forward applies (``HEAD_TRANSFORMS``).

    The weight and bias are the model's own parameters (tied to the input embedding or not), not copies.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"model: expected a linear output head (lm_head), got {type(head).__name__}")
    config = model.config
    transform = HEAD_TRANSFORMS.get(config.model_type)
    value = None if transform is None else getattr(config.get_text_config(), transform[0], None)
    if value is None:
        return LogitHead(head.weight, head.bias)
    name, kind = transform
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"model: config.{name} of a {config.model_type} model must be a number > 0, got {value!r}")
    if kind == SOFTCAP:
        return LogitHead(head.weight, head.bias, softcap=float(value))
    return LogitHead(head.weight, head.bias, scale=float(value) if kind == MULTIPLIER else 1.0 / value)


def last_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, D] final hidden states (after the final norm), from the base model alone: no logits. ``position_ids``
    (packed rows, whose positions restart) is passed only when given: not every body takes it."""
    positions = {} if position_ids is None else {"position_ids": position_ids}
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **positions)
    return out.last_hidden_state


@torch.no_grad()
def verify_head(model, head: LogitHead | None = None, *, backend: str = "torch") -> float:
    """Checks that selpo's log-probs of ``model`` (last hidden states, ``head`` (default ``read_head(model)``),
    ``linear_logprobs``) equal the model's own (``model(...).logits.float().log_softmax(-1)``) on one batch of
    ``VERIFY_TOKENS`` random token ids (seeded), in the model's dtype, outside autocast, in eval mode.

    The tolerance is ``VERIFY_ATOL + VERIFY_EPS_FACTOR * eps * max|logit|``, eps the machine epsilon of the
    model's dtype: 1e-3 covers float32 summation-order differences (the conformance suite measures about
    1e-6), the second term the rounding of a half-precision model's own logits (up to four roundings of
    relative eps/2 on each logit in a bf16 soft-cap, doubled by the log-softmax, plus selpo's own).
    Returns the largest difference; raises ``HeadMismatchError`` above the tolerance. ``backend`` is the
    op's: the reference ``"torch"`` path by default, since what is checked is the head, not the kernels.
    """
    head = read_head(model) if head is None else head
    device = head.weight.device
    vocab = min(head.weight.shape[0], model.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(VERIFY_SEED)
    ids = torch.randint(vocab, (1, VERIFY_TOKENS), generator=generator, device="cpu").to(device)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0, :-1]
            hidden = last_hidden_states(model, ids, mask)[0, :-1]
            targets = ids[0, 1:]
            cast = head.to(hidden.dtype)
            got = linear_logprobs(hidden, cast.weight, targets, backend=backend, **cast.op_kwargs()).float()
    finally:
        model.train(was_training)
    expected = logits.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    diff = float((got - expected).abs().max())
    eps = max(torch.finfo(hidden.dtype).eps, torch.finfo(logits.dtype).eps)
    tol = VERIFY_ATOL + VERIFY_EPS_FACTOR * eps * float(logits.float().abs().max())
    if not diff <= tol:
        raise HeadMismatchError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}): selpo's log-probs, from the last "
            f"hidden states through {head}, differ from the model's own by {diff:.3g} (tolerance {tol:.3g}): its "
            "forward transforms the logits in a way selpo does not read, and every log-prob selpo computes for it "
            "would be wrong. Please open an issue on the selpo repository with this message and the model's "
            "config.json.")
    return diff
