"""selpo's log-probs through ``read_head`` equal each architecture's own logits, values and gradients (issue 10).

Per decoder architecture of ``ARCHITECTURES``, a tiny random model (hidden 32, 2 layers, vocabulary 256) is built
from its config class in float32, every weight multiplied by 3 and its head transform set to a value that bends
the logits, so that a missed transform shows (``test_the_transform_matters`` proves it does for each). selpo's
path (last hidden states, ``read_head``, ``linear_logprobs`` with ``**head.op_kwargs()``) on every backend must
give the log-probs of ``model(input_ids).logits.float().log_softmax(-1)`` at the next tokens within
``LOGP_TOL``, and the gradients of ``sum(w * logp)`` (w random) with respect to every model parameter within
``GRAD_RTOL`` of the largest gradient entry. ``test_conformance_table`` prints what was checked (also without
``-s``). An architecture this transformers cannot build is skipped with the reason, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from selpo.head import LogitHead, last_hidden_states, read_head, verify_head
from selpo.kernels import linear_logprobs

# float32 throughout: the model's own path and selpo's differ only in rounding (measured: at most 9.5e-7, a few
# ulps of log-probs around -6).
LOGP_TOL = 5e-6
# Gradients, relative to the largest entry of the model's own gradient: float32 rounding amplified by the backward
# through the x3 weights (measured: at most 1.3e-5, on Gemma 4's tied embedding; 7e-15 when run in float64).
GRAD_RTOL = 1e-4
# A transform matters when ignoring it moves some log-prob by more than this.
MATTERS = 1e-2
WEIGHT_SCALE = 3.0
BACKENDS = ["torch", "naive", "triton"]
BATCH, LENGTH, VOCAB = 2, 20, 256


def text(**overrides) -> dict:
    """A tiny decoder config: hidden 32, 2 layers, 2 heads, vocabulary 256, with ``overrides``."""
    return {**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
            **overrides}


HEAD16 = dict(head_dim=16)  # for configs whose default head_dim is not hidden / heads
MOE = dict(num_local_experts=2, num_experts_per_tok=1)
GEMMA_PER_LAYER = dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
                       layer_types=["sliding_attention", "full_attention"], **HEAD16)
GEMMA3N = dict(GEMMA_PER_LAYER, final_logit_softcapping=2.0, intermediate_size=[64, 64], laurel_rank=4,
               altup_num_inputs=2, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0])
GEMMA4 = dict(GEMMA_PER_LAYER, final_logit_softcapping=2.0, global_head_dim=16)
GEMMA4_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=8, position_embedding_size=64)


@dataclass(frozen=True)
class Arch:
    """One architecture: its model_type, what its head does to the logits, and its config's arguments."""

    name: str
    model_type: str
    transform: str | None  # None: the logits are hidden @ lm_head.T (+ bias), nothing else
    config: dict = field(default_factory=text)


ARCHITECTURES = [
    Arch("Llama", "llama", None),
    Arch("Mistral", "mistral", None),
    Arch("Qwen2", "qwen2", None),
    Arch("Qwen3", "qwen3", None, text(**HEAD16)),
    Arch("Gemma", "gemma", None, text(**HEAD16)),
    Arch("Gemma 2", "gemma2", "softcap 2", text(**HEAD16, final_logit_softcapping=2.0)),
    Arch("Gemma 3 text (default)", "gemma3_text", None, text(**HEAD16)),
    Arch("Gemma 3 text (softcap)", "gemma3_text", "softcap 2", text(**HEAD16, final_logit_softcapping=2.0)),
    Arch("Gemma 3n text", "gemma3n_text", "softcap 2", text(**GEMMA3N)),
    Arch("Gemma 3n (multimodal)", "gemma3n", "softcap 2",
         {"text_config": text(**GEMMA3N), "vision_config": {"hidden_size": 16},
          "audio_config": {"hidden_size": 16, "conf_num_hidden_layers": 1, "conf_num_attention_heads": 2}}),
    Arch("Gemma 4 text", "gemma4_text", "softcap 2", text(**GEMMA4)),
    Arch("Gemma 4 (multimodal)", "gemma4", "softcap 2",
         {"text_config": text(**GEMMA4), "vision_config": GEMMA4_VISION, "audio_config": None}),
    Arch("Gemma 4 unified text", "gemma4_unified_text", "softcap 2", text(**GEMMA4)),
    Arch("VaultGemma", "vaultgemma", "softcap 2", text(**HEAD16, final_logit_softcapping=2.0)),
    Arch("RecurrentGemma", "recurrent_gemma", "softcap 2",
         text(logits_soft_cap=2.0, lru_width=32, attention_window_size=16, block_types=["recurrent", "attention"],
              num_key_value_heads=1)),
    Arch("NanoChat", "nanochat", "softcap 2", text(final_logit_softcapping=2.0)),
    Arch("Beam", "beam", "softcap 2", text(**HEAD16, final_logit_softcapping=2.0)),
    Arch("xLSTM", "xlstm", "softcap 2",
         text(output_logit_soft_cap=2.0, hidden_size=64, embedding_dim=64, num_blocks=2, num_heads=4, chunk_size=8)),
    Arch("Inkling2 text", "inkling2_text", "softcap 2",
         text(**HEAD16, final_logit_softcapping=2.0, unpadded_vocab_size=256, swa_num_attention_heads=2,
              swa_num_key_value_heads=2, swa_head_dim=16, sliding_window_size=16, d_rel=4, rel_extent=16,
              moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_layers_per_attn_res_block=1)),
    Arch("Phi-3", "phi3", None),
    Arch("Phi (lm_head bias)", "phi", None),
    Arch("Cohere", "cohere", "x logit_scale 0.0625"),
    Arch("Cohere2", "cohere2", "x logit_scale 0.0625"),
    Arch("Cohere2 MoE", "cohere2_moe", "x logit_scale 0.0625", text(**HEAD16, **MOE)),
    Arch("Cohere Compass text", "cohere_compass_text", "x logit_scale 0.25",
         text(**HEAD16, logit_scale=0.25,
              rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    Arch("Granite", "granite", "/ logits_scaling 4", text(logits_scaling=4.0)),
    Arch("Granite SWA", "granite_swa", "/ logits_scaling 4", text(**HEAD16, logits_scaling=4.0)),
    Arch("GraniteMoe", "granitemoe", "/ logits_scaling 4", text(logits_scaling=4.0, **MOE)),
    Arch("GraniteMoe SWA", "granitemoe_swa", "/ logits_scaling 4", text(**HEAD16, logits_scaling=4.0, **MOE)),
    Arch("GraniteMoeShared", "granitemoeshared", "/ logits_scaling 4", text(logits_scaling=4.0, **MOE)),
    Arch("GraniteMoeHybrid", "granitemoehybrid", "/ logits_scaling 4",
         text(logits_scaling=4.0, layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
              mamba_d_state=8, mamba_n_groups=1, **MOE)),
    Arch("MiniCPM3 (hidden / 4)", "minicpm3", "/ logits_scaling 4", text(dim_model_base=8)),
    Arch("HyperCLOVA X", "hyperclovax", "x logits_scaling 0.5", text(logits_scaling=0.5)),
    Arch("Falcon-H1", "falcon_h1", "x lm_head_multiplier 2.5",
         text(lm_head_multiplier=2.5, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
              mamba_n_groups=1, mamba_chunk_size=8)),
    Arch("OLMo 2", "olmo2", None),
    Arch("StableLM", "stablelm", None),
    Arch("GPT-NeoX", "gpt_neox", None),
    Arch("GPT-2", "gpt2", None),
    Arch("Falcon", "falcon", None),
    Arch("MPT (logit_scale 2, not applied)", "mpt", None, text(logit_scale=2.0)),
]
RESULTS: list[tuple[Arch, str, float, float]] = []  # (architecture, backend, max |d logp|, max |d grad| / max |grad|)
SKIPPED: dict[str, str] = {}  # architecture name -> why it could not be built


def slug(arch: Arch) -> str:
    """The test id of an architecture: its name in lower case, e.g. ``gemma-3-text-softcap``."""
    return re.sub(r"\W+", "-", arch.name.lower()).strip("-")


def build(arch: Arch):
    """The tiny model of ``arch`` in eval mode, weights x3; skipped, with the reason, if it cannot be built."""
    try:
        config = AutoConfig.for_model(arch.model_type, **arch.config)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:  # whatever stops this installation from building it is a skip that names it
        SKIPPED[arch.name] = " ".join(f"{type(e).__name__}: {e}".split())
        pytest.skip(f"{arch.name}: {arch.model_type!r} cannot be built with transformers {transformers.__version__} "
                    f"here: {SKIPPED[arch.name]}")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(WEIGHT_SCALE)
    return model.eval()


def batch_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def model_logps(model, ids: torch.Tensor) -> torch.Tensor:
    """[B * (T-1)] the model's own log-probs of the next tokens, from its full logits."""
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, :-1]
    return logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).flatten()


def selpo_logps(model, ids: torch.Tensor, backend: str, head: LogitHead | None = None) -> torch.Tensor:
    """[B * (T-1)] the same through selpo: last hidden states, the head, linear_logprobs."""
    hidden = last_hidden_states(model, ids, torch.ones_like(ids))[:, :-1].flatten(0, 1)
    head = read_head(model) if head is None else head
    return linear_logprobs(hidden, head.weight, ids[:, 1:].flatten(), backend=backend, **head.op_kwargs())


def gradients(model, logps: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """d sum(w * logps) / d every parameter (zeros where unused)."""
    params = list(model.parameters())
    grads = torch.autograd.grad((w * logps).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=slug)
def test_log_probs_and_gradients_match_the_model(arch):
    model = build(arch)
    ids = batch_ids()
    expected = model_logps(model, ids)
    assert torch.isfinite(expected).all()
    w = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    expected_grads = gradients(model, expected, w)
    scale = max(float(g.abs().max()) for g in expected_grads)
    for backend in BACKENDS:
        got = selpo_logps(model, ids, backend)
        logp_diff = float((got - expected).detach().abs().max())
        grad_diff = max(float((a - b).abs().max()) for a, b in zip(gradients(model, got, w), expected_grads))
        RESULTS.append((arch, backend, logp_diff, grad_diff / scale))
        assert logp_diff <= LOGP_TOL, f"{arch.name}, {backend}: log-probs differ by {logp_diff:.3g}"
        assert grad_diff <= GRAD_RTOL * scale, f"{arch.name}, {backend}: gradients differ by {grad_diff:.3g}"
    assert verify_head(model) <= LOGP_TOL


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a.transform], ids=slug)
def test_the_transform_matters(arch):
    """Ignoring the head's transform moves the log-probs: the test above would catch a read_head that missed it."""
    model = build(arch)
    head = read_head(model)
    assert not head.plain
    with torch.no_grad():
        ids = batch_ids()
        ignored = selpo_logps(model, ids, "torch", LogitHead(head.weight, head.bias))
        assert float((ignored - model_logps(model, ids)).abs().max()) > MATTERS


def test_conformance_table(capsys):
    """Prints, per architecture checked in this session, its transform and largest differences over the backends,
    and the architectures skipped with the reason."""
    lines = [f"{'architecture':34} {'transform':24} {'max |d logp|':>13} {'max |d grad|/max|grad|':>23}  backends"]
    for name in dict.fromkeys(a.name for a, *_ in RESULTS):
        rows = [r for r in RESULTS if r[0].name == name]
        arch = rows[0][0]
        lines.append(f"{arch.name:34} {arch.transform or '-':24} {max(r[2] for r in rows):13.2e} "
                     f"{max(r[3] for r in rows):23.2e}  {','.join(r[1] for r in rows)}")
    lines += [f"{name:34} skipped: {reason}" for name, reason in SKIPPED.items()]
    with capsys.disabled():
        print("\nhead conformance (float32, transformers " + transformers.__version__ + "):\n" + "\n".join(lines))
