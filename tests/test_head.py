"""selpo.head: the folding of a head's scale and soft-cap into the ops' arguments, its argument checks, and the
self-check ``verify_head`` (which ``load_causal_lm`` runs) against a plain model and a planted transform."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from selpo import head as head_module
from selpo.head import HeadMismatchError, LogitHead, read_head, verify_head
from selpo.kernels import linear_logprobs
from selpo.models import load_causal_lm
from selpo.testing import tiny_model_dir

TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=128)


class ScaledLlama(LlamaForCausalLM):
    """A Llama whose forward multiplies its logits by 1.7: a head transform that selpo does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.7
        return out


def tiny(model_type: str = "llama", dtype: torch.dtype = torch.float32, cls=None, **overrides):
    """A tiny random model (of class ``cls``, else the model type's) in ``dtype``, its weights x3 so that its
    logits are far from uniform."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY, **overrides)
    model = (AutoModelForCausalLM.from_config(config) if cls is None else cls(config)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


@pytest.mark.parametrize("scale, softcap, temperature", [(1.0, None, 1.0), (0.0625, None, 1.0), (0.25, None, 0.7),
                                                         (2.5, 3.0, 1.0), (0.5, 2.0, 1.3), (1.0, 2.0, 0.8)])
def test_op_kwargs_fold_the_scale_exactly(scale, softcap, temperature):
    """log_softmax(softcap_c(s * (h W^T + b)) / T) through the ops' bias, softcap and temperature alone."""
    h, w, b = torch.randn(12, 16, dtype=torch.float64) * 3, torch.randn(40, 16, dtype=torch.float64), torch.randn(40)
    targets = torch.randint(40, (12,))
    z = scale * (h @ w.T + b.double())
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    expected = torch.log_softmax(z / temperature, -1).gather(1, targets[:, None])[:, 0]
    head = LogitHead(w, b.double(), scale=scale, softcap=softcap)
    got = linear_logprobs(h, head.weight, targets, backend="torch", **head.op_kwargs(temperature))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_plain_is_what_token_scores_computes():
    w = torch.randn(8, 4)
    assert LogitHead(w, None).plain
    assert not LogitHead(w, torch.zeros(8)).plain
    assert not LogitHead(w, None, scale=2.0).plain
    assert not LogitHead(w, None, softcap=30.0).plain


@pytest.mark.parametrize("kwargs, message", [(dict(scale=0.0), "scale must be a finite number > 0"),
                                             (dict(scale=float("inf")), "scale must be a finite number > 0"),
                                             (dict(softcap=-1.0), "softcap must be None or a number > 0")])
def test_logit_head_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LogitHead(torch.randn(8, 4), None, **kwargs)


def test_op_kwargs_rejects_a_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        LogitHead(torch.randn(8, 4), None).op_kwargs(temperature=0.0)


def test_read_head_rejects_a_non_positive_transform():
    model = tiny("cohere", logit_scale=-1.0)
    with pytest.raises(ValueError, match=r"model: config.logit_scale of a cohere model must be a number > 0"):
        read_head(model)


def test_read_head_reads_by_model_type_not_by_field_name():
    """Granite divides by ``logits_scaling``, HyperCLOVA X multiplies; MPT ignores its ``logit_scale``."""
    assert read_head(tiny("granite", logits_scaling=4.0)).scale == 0.25
    assert read_head(tiny("hyperclovax", logits_scaling=4.0)).scale == 4.0
    assert read_head(tiny("gemma2", final_logit_softcapping=5.0, head_dim=16)).softcap == 5.0
    assert read_head(tiny("mpt", logit_scale=2.0)).plain
    assert read_head(tiny()).plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_head_passes_a_model_it_reads(dtype):
    assert verify_head(tiny(dtype=dtype)) <= (1e-5 if dtype == torch.float32 else 0.1)
    assert verify_head(tiny("gemma2", dtype, final_logit_softcapping=2.0, head_dim=16)) <= 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_head_names_an_unknown_transform(dtype):
    model = tiny(dtype=dtype, cls=ScaledLlama)
    pattern = (r"ScaledLlama \(model_type 'llama'\): selpo's log-probs, from the last hidden states through "
               r"LogitHead\(scale=1.0, softcap=None\), differ from the model's own by [0-9.e+-]+ \(tolerance "
               r"[0-9.e+-]+\).*open an issue on the selpo repository with this message and the model's config.json")
    with pytest.raises(HeadMismatchError, match=pattern):
        verify_head(model)


def test_verify_head_runs_in_eval_outside_autocast_and_restores_the_mode():
    model = tiny().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert verify_head(model) <= 1e-5  # float32, as the model is: autocast is off inside
    assert model.training


def test_load_causal_lm_runs_the_self_check(tmp_path, monkeypatch):
    """A head read wrongly (here a Llama's head made to scale its logits by its rms_norm_eps) fails at load."""
    folder = tiny_model_dir(tmp_path)
    load_causal_lm(folder)
    monkeypatch.setitem(head_module.HEAD_TRANSFORMS, "llama", ("rms_norm_eps", head_module.MULTIPLIER))
    with pytest.raises(HeadMismatchError, match="LlamaForCausalLM"):
        load_causal_lm(folder)
