"""LoRA adapters through PEFT (selpo.lora) in the trainer, the stages and the fused ops, on a tiny random Llama.

A LoRA DPO step's loss and adapter gradients against PEFT's own model forward (full logits), in every token layout,
with the lean body (its MLPs adapted or not) and gradient checkpointing; the frozen head (and a lean MLP over
frozen weights) costs no weight-gradient GEMM; the adapter disabled is the initial model; checkpoints hold the
adapter only and resume bitwise; the saved folders load with PEFT and transformers; `selpo run` with LoRA on every
training stage; bad keys named.
"""

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from selpo import checkpoint, lean_lora, lora
from selpo.batches import Example, collate
from selpo.config import LoopConfig, RunConfig, apply_overrides
from selpo.context import row_pair
from selpo.data import load_preference_dataset, tokenize_pairs
from selpo.kernels import linear_logprobs, linear_selective_loss
from selpo.lean_body import lean_body, swiglu_mlp
from selpo.logprobs import pair_logps
from selpo.methods import DPO, with_reference_logps
from selpo.models import load_causal_lm
from selpo.packing_check import choose_layout
from selpo.recompute import enable_gradient_checkpointing
from selpo.reward_model import load_reward_model
from selpo.segment_attention import segment_attention
from selpo.testing import tiny_model_dir
from selpo.trainer import make_accelerator, train

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import selpo as _selpo  # noqa: E402
from cli_runs import tiny_settings  # noqa: E402
from test_recompute import OpCounter  # noqa: E402
from tiny_data import write_pairs  # noqa: E402

LORA = LoopConfig(batch_size=4, micro_batch_size=2, lr=1e-2, max_steps=4, save_every=2, warmup_ratio=0.0,
                  lora_rank=4, lora_dropout=0.1)
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return tiny_model_dir(root), write_pairs(root / "pairs.jsonl", 16), root


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator(RunConfig(device="cpu"))


@pytest.fixture(scope="module")
def examples(tiny, accelerator):
    model, tokenizer = load_causal_lm(tiny[0])
    pairs, _ = tokenize_pairs(load_preference_dataset(tiny[1]), tokenizer, max_length=48, max_prompt_length=24)
    return with_reference_logps(accelerator, model, [Example(p) for p in pairs], pad_id=tokenizer.pad_token_id,
                                batch_size=8, backend="torch")


def _adapted(model_dir, targets=LORA.lora_targets):
    """The tiny model with a fresh adapter whose B matrices are random (PEFT starts them at 0: no effect, and no
    gradient for A), so that the adapter changes the log-probs and every adapter weight gets a gradient."""
    model, tokenizer = load_causal_lm(model_dir)
    lora.add_adapter(model, dataclasses.replace(LORA, lora_dropout=0.0, lora_targets=targets), "train")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model, tokenizer


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _peft_dpo_loss(model, batch, beta):
    """DPO's loss by hand from PEFT's own forward: full logits, log_softmax, gather, sums per response."""
    p = batch.pairs
    logits = model.__dict__[lora.PEFT](input_ids=p.input_ids, attention_mask=p.attention_mask).logits.float()
    logps = torch.log_softmax(logits.flatten(0, 1)[p.positions], -1).gather(1, p.targets[:, None]).squeeze(1)
    ratio = logps - batch.extras["ref_logps"]
    cu = p.cu_seqlens.tolist()
    sums = torch.stack([ratio[cu[s]:cu[s + 1]].sum() for s in range(len(cu) - 1)])
    half = sums.shape[0] // 2
    return -F.logsigmoid(beta * (sums[:half] - sums[half:])).mean()


@pytest.mark.parametrize("layout,lean,checkpointing,targets", [
    ("padded", False, False, LORA.lora_targets),
    ("shared", True, True, LORA.lora_targets),  # lean RMSNorms (no lean MLP under checkpointing), checkpointed layers
    ("packed", True, False, "q_proj,v_proj"),  # lean MLPs over frozen weights
    ("padded", True, False, LORA.lora_targets),  # lean LoRA MLPs (selpo.lean_lora)
    ("shared", True, False, "gate_proj,down_proj,k_proj"),  # lean LoRA MLPs, up_proj not adapted
])
def test_lora_dpo_step_matches_peft_forward(tiny, examples, layout, lean, checkpointing, targets, monkeypatch):
    lean_lora_calls = []
    monkeypatch.setattr(lean_lora, "lora_swiglu_mlp", lambda *a, _f=lean_lora.lora_swiglu_mlp, **k: (
        lean_lora_calls.append(1), _f(*a, **k))[1])
    model, tokenizer = _adapted(tiny[0], targets)
    choose_layout(model, layout)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model, keep_attention=True)
    batch = collate(examples[:4], tokenizer.pad_token_id, layout)
    with contextlib.ExitStack() as stack:
        swapped = stack.enter_context(lean_body(model, mlp=not checkpointing)) if lean else []
        if layout != "padded":  # as the trainer: a checkpointed layer replays its attention in the backward
            stack.enter_context(segment_attention(model))
        lean_lora_calls.clear()  # lean_body's check of each swapped MLP ran it once
        loss, _ = DPO(beta=0.5, backend="torch").loss(model, batch)
        loss.backward()
    mlps = [name for name in swapped if name.endswith(".mlp")]
    assert len(mlps) == (model.config.num_hidden_layers if lean and not checkpointing else 0)
    adapted_mlps = "gate_proj" in targets and lean and not checkpointing  # then run as selpo.lean_lora's MLP
    assert len(lean_lora_calls) == (len(mlps) if adapted_mlps else 0)
    assert bool(swapped) == lean
    grads = _adapter_grads(model)
    model.zero_grad(set_to_none=True)
    expected = _peft_dpo_loss(model, collate(examples[:4], tokenizer.pad_token_id), 0.5)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert expected.item() != pytest.approx(0.6931472, abs=1e-3)  # the adapter moved the policy off the reference
    assert grads.keys() == _adapter_grads(model).keys() and all("lora_" in n for n in grads)
    for name, grad in _adapter_grads(model).items():
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    head = model.get_output_embeddings().weight
    assert head is model.get_input_embeddings().weight  # tied, and frozen with it
    assert not head.requires_grad and head.grad is None


@pytest.mark.parametrize("op", ["linear_logprobs", "linear_selective_loss"])
def test_frozen_head_weight_gets_no_gradient_gemm(op):
    """Under LoRA the head is frozen: the fused ops run one GEMM fewer (no dL/dweight) and leave its grad None."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 16, generator=generator)
    targets = torch.randint(0, 50, (12,), generator=generator)
    cu = torch.tensor([0, 3, 6, 9, 12], dtype=torch.int32)
    ref = torch.randn(12, generator=generator)

    def forward(h, w):
        if op == "linear_logprobs":
            return (linear_logprobs(h, w, targets, backend="torch") * torch.arange(12.0)).sum()
        return linear_selective_loss(h, w, targets, cu, loss="dpo", ref_logps=ref, beta=0.5, backend="torch")[0]

    counts = {}
    for trained in (True, False):
        weight = torch.randn(50, 16, generator=generator).requires_grad_(trained)
        h = hidden.clone().requires_grad_()
        with OpCounter() as counted:
            forward(h, weight).backward()
        counts[trained] = sum(n for name, n in counted.counts.items() if name.split(".")[0] in GEMMS)
        assert h.grad is not None and (weight.grad is not None) == trained
    assert counts[False] == counts[True] - 1, counts


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # PEFT 0.21 on transformers 5
def test_adapter_off_is_the_initial_model_and_the_saved_folder_loads(tiny, accelerator, examples, tmp_path):
    model, tokenizer = load_causal_lm(tiny[0])
    one_step = dataclasses.replace(LORA, max_steps=1, save_every=0, lora_dropout=0.0)
    trained = train(accelerator, model, tokenizer, DPO(beta=0.5, backend="torch"), examples, one_step, tmp_path,
                    seed=0)
    assert trained is model and lora.has_adapter(model)
    pairs = [e.pair for e in examples]

    def logps(m):
        return torch.cat([torch.cat(pair) for pair in pair_logps(accelerator, m, pairs, pad_id=tokenizer.pad_token_id,
                                                                 batch_size=8, backend="torch")])

    initial = logps(load_causal_lm(tiny[0])[0])
    with lora.adapter_disabled(model):
        off = logps(model)
    on = logps(model)
    torch.testing.assert_close(off, initial, atol=1e-6, rtol=0)
    assert (on - initial).abs().max() > 1e-4  # one step moved the adapter
    # The model folder holds the adapter and the tokenizer, no base weight; PEFT and selpo load it onto the base.
    folder = tmp_path / "model"
    assert (folder / "adapter_config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.glob("model*.safetensors"))
    assert all("lora_" in key for key in load_file(folder / "adapter_model.safetensors"))
    assert lora.adapter_base(folder) == str(Path(tiny[0]).resolve())
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[0]), str(folder))
    torch.testing.assert_close(logps(peft.get_base_model()), on, atol=1e-6, rtol=0)
    loaded, _ = load_causal_lm(str(folder))
    torch.testing.assert_close(logps(loaded), on, atol=1e-6, rtol=0)


class Killed(Exception):
    pass


def _train_lora(tiny, accelerator, examples, out, kill_after=None):
    model, tokenizer = load_causal_lm(tiny[0])

    def on_step(step):
        if step == kill_after:
            raise Killed

    return train(accelerator, model, tokenizer, DPO(beta=0.5, backend="torch"), examples, LORA, out, seed=3,
                 fingerprint="lora", on_step=on_step)


def test_lora_resume_after_a_kill_gives_the_same_adapter(tiny, accelerator, examples, tmp_path):
    whole = _train_lora(tiny, accelerator, examples, tmp_path / "whole")
    with pytest.raises(Killed):  # killed after step 3; the last checkpoint is step 2's
        _train_lora(tiny, accelerator, examples, tmp_path / "resumed", kill_after=3)
    folder, state = checkpoint.latest(tmp_path / "resumed" / "checkpoints")
    assert state["step"] == 2
    # The checkpoint holds the adapter and its optimizer state, not the frozen base.
    saved = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert saved and all(".lora_" in key for key in saved)
    model_bytes = sum(p.numel() * p.element_size() for p in whole.parameters())
    assert sum(f.stat().st_size for f in folder.iterdir()) < model_bytes / 2
    resumed = _train_lora(tiny, accelerator, examples, tmp_path / "resumed")
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed adapter differs from the uninterrupted run's"
    initial = load_causal_lm(tiny[0])[0].state_dict()
    adapter = [k for k in a if "lora_B" in k]
    assert adapter and all(not torch.equal(a[k], torch.zeros_like(a[k])) for k in adapter)
    frozen = {k.replace(".base_layer", ""): v for k, v in a.items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in initial.items())  # the base did not move


def test_selpo_run_with_lora_on_every_stage(tiny, tmp_path):
    """SePO with LoRA oracle and policy: adapter folders, the score stage's reference the oracle's own base, and
    the policy merged into a full folder that gives the adapter model's log-probs."""
    model_dir, train_file, root = tiny
    test_file = write_pairs(root / "test.jsonl", 6, seed=1)
    settings = tiny_settings(model_dir, train_file, test_file, **{
        "oracle.lora_rank": 4, "oracle.lr": 5e-2, "train.lora_rank": 4, "train.lr": 5e-2, "train.lora_merge": "true",
        "data.packing": "shared", "train.gradient_checkpointing": "true", "eval.reward": "none"})
    run_dir = tmp_path / "run"
    code, _, err = _selpo("run", "--run-dir", run_dir, *settings)
    assert code == 0, err[-3000:]
    for stage in ("oracle", "train"):
        assert lora.adapter_base(run_dir / stage / "model") == str(Path(model_dir).resolve()), stage
        assert not list((run_dir / stage / "model").glob("model*.safetensors"))
    assert not (run_dir / "oracle" / "merged").exists()
    # score: log p_oracle - log p_initial, the initial model being the oracle's base with its adapter disabled
    rows = [json.loads(line) for line in (run_dir / "score" / "scored.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()][:4]
    accelerator = make_accelerator(RunConfig(device="cpu"))
    pairs = [row_pair(r) for r in pairs]

    def logps(m):
        return [torch.cat(p) for p in pair_logps(accelerator, m, pairs, pad_id=0, batch_size=4, backend="torch")]

    oracle, initial = load_causal_lm(str(run_dir / "oracle" / "model"))[0], load_causal_lm(model_dir)[0]
    for row, o, i in zip(rows, logps(oracle), logps(initial)):
        torch.testing.assert_close(torch.tensor(row["chosen_scores"] + row["rejected_scores"]), o - i, atol=1e-5,
                                   rtol=0)
    assert any(s != 0 for row in rows for s in row["chosen_scores"])
    # the merged policy: a plain transformers folder with the adapter model's log-probs
    policy = load_causal_lm(str(run_dir / "train" / "model"))[0]
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "train" / "merged")
    assert not lora.has_adapter(merged)
    torch.testing.assert_close(torch.cat(logps(merged)), torch.cat(logps(policy)), atol=1e-5, rtol=0)
    assert (torch.cat(logps(policy)) - torch.cat(logps(initial))).abs().max() > 1e-4
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["initial"]["kl"] == 0 and results["policy"]["kl"] != 0


def test_guidance_run_with_lora_reward_model(tiny, tmp_path):
    """Guidance with LoRA on its reward model (the scalar head trained in full) and on the policy; the saved reward
    adapter loads onto its base, and a retraining (guidance's rounds) trains that same adapter and head again."""
    model_dir, train_file, root = tiny
    settings = tiny_settings(model_dir, train_file, write_pairs(root / "test-g.jsonl", 4, seed=2), **{
        "method": "guidance", "guidance.lora_rank": 4, "guidance.lr": 5e-2, "train.lora_rank": 4,
        "guidance.rounds": 1, "guidance.every": 2, "guidance.retrain_epochs": 1, "guidance.lora_merge": "true"})
    run_dir = tmp_path / "run"
    for stage in ("data", "guidance", "train"):  # eval and report hold no LoRA of their own for this method
        code, _, err = _selpo(stage, "--run-dir", run_dir, *settings)
        assert code == 0, err[-3000:]
    for folder in ("guidance", "train/rewards/round-1"):  # the first reward model, and its retraining
        keys = load_file(run_dir / folder / "model" / "adapter_model.safetensors")
        assert any("lora_" in k for k in keys) and any(k.split(".")[-2] == "score" for k in keys), folder
        assert (run_dir / folder / "merged" / "config.json").is_file(), folder
    assert lora.adapter_base(run_dir / "train" / "model") == str(Path(model_dir).resolve())
    reward_model, _ = load_reward_model(str(run_dir / "guidance" / "model"))
    fresh, _ = load_reward_model(model_dir)
    assert lora.has_adapter(reward_model) and not any(p.requires_grad for p in reward_model.parameters())
    assert not torch.equal(reward_model.score.weight, fresh.score.weight)  # the trained head, not a fresh one
    merged, _ = load_reward_model(str(run_dir / "guidance" / "merged"))  # a full folder: base, adapter and head
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reward_model(input_ids=ids).logits, atol=1e-5, rtol=0)
    lora.add_adapter(reward_model, LORA, "guidance")
    trained = {n for n, p in reward_model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or ".modules_to_save." in n for n in trained)
    assert any("score" in n for n in trained)


@pytest.mark.parametrize("key,value,message", [
    ("train.lora_rank", "-1", "must be >= 0"),
    ("oracle.lora_alpha", "0", "must be > 0"),
    ("guidance.lora_dropout", "1", "must lie in"),
    ("train.lora_targets", "q_proj,,v_proj", "must be comma-separated module names"),
    ("oracle.lora_merge", "true", "needs lora_rank > 0"),
])
def test_bad_lora_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=f"^{key} {message}"):
        apply_overrides(RunConfig(), [f"{key}={value}"])


@pytest.mark.parametrize("targets,message", [("lm_head,q_proj", "names the output head"),
                                             ("nothing_here", "names no module")])
def test_lora_targets_the_model_cannot_take_name_the_key(tiny, targets, message):
    model, _ = load_causal_lm(tiny[0])
    with pytest.raises(ValueError, match=f"^oracle.lora_targets.*{message}"):
        lora.add_adapter(model, dataclasses.replace(LORA, lora_targets=targets), "oracle")


def test_a_merge_of_lora_on_a_layer_that_is_not_linear_is_refused_before_training(tiny):
    """``merged_state_dict`` folds B A into weight matrices: an embedding's LoRA with ``lora_merge`` stops at the
    adapter's injection, naming the layer, instead of at the merged folder after the training."""
    config = dataclasses.replace(LORA, lora_targets="embed_tokens,q_proj")
    model, _ = load_causal_lm(tiny[0])
    lora.add_adapter(model, config, "train")  # without a merge the adapter trains
    model, _ = load_causal_lm(tiny[0])
    with pytest.raises(ValueError, match=r"^train.lora_merge: .*model.embed_tokens \(Embedding\)"):
        lora.add_adapter(model, dataclasses.replace(config, lora_merge=True), "train")


class _GEMMsOn(OpCounter):
    """Counts the forward GEMMs of the given weights (x @ weight.T: the weight read transposed, where a backward
    GEMM reads it as it is), by the weight's name."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {w.data_ptr(): name for name, w in weights.items()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().split(".")[0].rstrip("_") in GEMMS:  # addmm_ too
            for t in args:
                if isinstance(t, torch.Tensor) and t.data_ptr() in self.names and t.dim() == 2 and t.stride(0) == 1:
                    self.counts[self.names[t.data_ptr()]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "peft"])
def test_checkpointed_recomputation_skips_the_last_projections_base_gemm(tiny, lean):
    """Checkpointed layers with lean LoRA projections (selpo.lean_lora.lora_linear): the recomputation in the
    backward stops before the down projection's base GEMM (the last tensor the layer saves is that GEMM's weight),
    while it reruns the others; with PEFT's forward it runs that GEMM too."""
    model, _ = _adapted(tiny[0])
    model.train()
    enable_gradient_checkpointing(model)
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    weights = {f"{part}.{i}": getattr(layer.mlp, part).base_layer.weight
               for i, layer in enumerate(layers) for part in ("gate_proj", "down_proj")}
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with lean_body(model, mlp=False) if lean else contextlib.nullcontext():
        with _GEMMsOn(weights) as forward:
            logits = model(input_ids=ids).logits
        with _GEMMsOn(weights) as backward:
            logits.float().square().mean().backward()
    assert forward.counts == {name: 1 for name in weights}, forward.counts
    assert backward.counts == {name: 1 for name in weights if lean is False or name.startswith("gate")}, \
        backward.counts


def test_lean_mlp_over_frozen_weights_runs_no_weight_gradient_gemm():
    """An MLP that LoRA leaves unadapted keeps its frozen weights: the lean MLP's backward skips their three GEMMs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=generator)
    weights = [torch.randn(shape, generator=generator) for shape in ((24, 16), (24, 16), (16, 24))]
    counts, grads = {}, {}
    for trained in (True, False):
        w = [t.clone().requires_grad_(trained) for t in weights]
        h = x.clone().requires_grad_()
        with OpCounter() as counted:
            swiglu_mlp(h, *w).pow(2).sum().backward()
        counts[trained] = sum(n for name, n in counted.counts.items() if name.split(".")[0] in GEMMS)
        grads[trained] = h.grad
    assert counts[False] == counts[True] - 3, counts
    torch.testing.assert_close(grads[False], grads[True], atol=0, rtol=0)


def test_the_adapter_and_the_merged_model_are_saved_from_the_gathered_state(tiny, accelerator, tmp_path,
                                                                             monkeypatch):
    """Under FSDP a process's own weights are shards; ``save_model`` writes the adapter and the merged folder from
    the state ``Accelerator.get_state_dict`` gathers. Here the gathered state is a snapshot and the model's own
    weights are then spoiled: both folders must hold the snapshot's adapter, and the merged one PEFT's merge of it."""
    from selpo.trainer import save_model

    model, tokenizer = _adapted(tiny[0])
    peft = lora._peft(model)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {f"{name}.weight": module.get_delta_weight("default") + module.get_base_layer().weight.detach()
                for name, module in model.named_modules() if hasattr(module, "get_delta_weight")}
    ids = torch.tensor([[5, 9, 3, 7, 11, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        for param in model.parameters():
            param.fill_(float("nan"))
    module = torch.nn.Module()
    module.lm = model
    monkeypatch.setattr(accelerator, "get_state_dict", lambda m: {f"lm.{k}": v for k, v in snapshot.items()})
    save_model(accelerator, module, tokenizer, tmp_path / "adapter", merged=tmp_path / "merged")

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    state = peft.state_dict()
    assert adapter and all(torch.equal(v, snapshot[k.removeprefix("base_model.model.").replace(
        ".weight", ".default.weight")]) for k, v in adapter.items()), sorted(adapter)[:4]
    assert len(adapter) == sum("lora_" in k for k in state)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    weights = dict(merged.named_parameters())
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=0)
    reloaded, _ = load_causal_lm(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, atol=1e-5, rtol=0)
