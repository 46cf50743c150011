"""The training loop (selpo.trainer), its checkpoints (selpo.checkpoint) and methods (selpo.methods).

On a tiny random Llama: the methods' losses against full-logit math, exact resume after a kill, a crash
while saving, and 2 processes (gloo) against 1 with the same global batch.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from selpo import checkpoint
from selpo.batches import Example, collate
from selpo.config import LoopConfig, RunConfig
from selpo.data import load_preference_dataset, tokenize_pairs
from selpo.kernels import linear_logprobs, weighted_nll
from selpo.logprobs import response_states
from selpo.methods import DPO, SePO, with_reference_logps
from selpo.models import load_causal_lm
from selpo.testing import tiny_model_dir
from selpo.trainer import make_accelerator, read_metrics, train, warmup_cosine

sys.path.insert(0, str(Path(__file__).parent))
from test_recompute import OpCounter  # noqa: E402
from tiny_data import write_pairs  # noqa: E402
from trainer_case import LOOP, run_case  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS = LoopConfig(batch_size=4, micro_batch_size=2, lr=1e-3, max_steps=5, save_every=2, warmup_ratio=0.2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_model_dir(root), write_pairs(root / "pairs.jsonl", 24), tiny_model_dir(root / "other", seed=1)


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator(RunConfig(device="cpu"))


@pytest.fixture(scope="module")
def dpo_examples(tiny, accelerator):
    model_dir, data, _ = tiny
    model, tokenizer = load_causal_lm(model_dir)
    pairs, _ = tokenize_pairs(load_preference_dataset(data), tokenizer, max_length=48, max_prompt_length=24)
    return with_reference_logps(accelerator, model, [Example(p) for p in pairs], pad_id=tokenizer.pad_token_id,
                                batch_size=5, backend="torch")


def _full_logit_logps(model, batch):
    """Per response token log-probs from the model's full logits: the reference the methods must match."""
    p = batch.pairs
    logits = model(input_ids=p.input_ids, attention_mask=p.attention_mask).logits.float()
    return torch.log_softmax(logits.flatten(0, 1)[p.positions], -1).gather(1, p.targets[:, None]).squeeze(1)


def _segment(values, cu, reduce):
    return torch.stack([reduce(values[cu[s]:cu[s + 1]]) for s in range(len(cu) - 1)])


def test_sepo_loss_matches_full_logits(tiny):
    model_dir, data, _ = tiny
    model, tokenizer = load_causal_lm(model_dir)
    pairs, _ = tokenize_pairs(load_preference_dataset(data), tokenizer, max_length=48, max_prompt_length=24)
    generator = torch.Generator().manual_seed(1)
    examples = []
    for pair in pairs[:3]:
        masks = []
        for ids in (pair.chosen_ids, pair.rejected_ids):
            mask = torch.rand(len(ids), generator=generator) < 0.4
            mask[0] = True  # every response needs a selected token
            masks.append(mask)
        examples.append(Example(pair, {"mask": tuple(masks)}))
    batch = collate(examples, tokenizer.pad_token_id)
    loss, metrics = SePO(gamma=1.7, margin=0.2, backend="torch").loss(model, batch)

    logps, mask, cu = _full_logit_logps(model, batch), batch.extras["mask"], batch.pairs.cu_seqlens.tolist()
    u = 1.7 * _segment(torch.where(mask, logps, 0.0), cu, torch.sum) / _segment(mask.float(), cu, torch.sum)
    expected = -F.logsigmoid(u[:3] - u[3:] - 0.2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["margin"], (u[:3] - u[3:]).detach(), atol=1e-5, rtol=1e-5)
    assert metrics["selected"].tolist() == _segment(mask.long(), cu, torch.sum).tolist()
    loss.backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_methods_run_the_ops_in_bf16_under_autocast(tiny, dpo_examples):
    """Mixed precision: the op gets bf16 hidden states and head, gradients reach the fp32 weights."""
    model, tokenizer = load_causal_lm(tiny[0])
    batch = collate(dpo_examples[:4], tokenizer.pad_token_id)
    full, _ = DPO(beta=0.3, backend="torch").loss(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, head = response_states(model, batch.pairs)
        loss, _ = DPO(beta=0.3, backend="torch").loss(model, batch)
    assert hidden.dtype == head.weight.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and abs(loss.item() - full.item()) < 0.05
    loss.backward()
    head = model.get_output_embeddings().weight
    assert head.dtype == head.grad.dtype == torch.float32 and head.grad.abs().sum() > 0


def test_dpo_reference_logps_match_full_logits_and_start_at_log2(tiny, dpo_examples):
    model, tokenizer = load_causal_lm(tiny[0])
    batch = collate(dpo_examples[:4], tokenizer.pad_token_id)
    torch.testing.assert_close(batch.extras["ref_logps"], _full_logit_logps(model, batch).detach(),
                               atol=1e-5, rtol=1e-5)
    loss, metrics = DPO(beta=0.3, backend="torch").loss(model, batch)
    torch.testing.assert_close(loss, torch.tensor(0.6931472), atol=1e-5, rtol=0)  # policy == reference
    assert metrics["margin"].abs().max() < 1e-5


def test_extras_must_cover_every_response_token(tiny, dpo_examples):
    model, tokenizer = load_causal_lm(tiny[0])
    chosen, rejected = dpo_examples[0].extras["ref_logps"]
    short = Example(dpo_examples[0].pair, {"ref_logps": (chosen[:-1], rejected)})
    with pytest.raises(ValueError, match="extra 'ref_logps' has .* values for .* response tokens"):
        collate([short], tokenizer.pad_token_id)


def _train_dpo(tiny, accelerator, examples, out, on_step=None, fingerprint="f", loop=STEPS, before_step=None):
    model, tokenizer = load_causal_lm(tiny[0])
    return train(accelerator, model, tokenizer, DPO(beta=0.5, backend="torch"), examples, loop, out, seed=3,
                 fingerprint=fingerprint, on_step=on_step, before_step=before_step)


class Killed(Exception):
    pass


def _kill_after(k):
    def on_step(step):
        if step == k:
            raise Killed

    return on_step


def test_resume_after_a_kill_gives_the_same_weights(tiny, accelerator, dpo_examples, tmp_path):
    whole = _train_dpo(tiny, accelerator, dpo_examples, tmp_path / "whole")
    with pytest.raises(Killed):  # killed after step 3; the last checkpoint is step 2's
        _train_dpo(tiny, accelerator, dpo_examples, tmp_path / "resumed", _kill_after(3))
    assert checkpoint.latest(tmp_path / "resumed" / "checkpoints")[1]["step"] == 2
    resumed = _train_dpo(tiny, accelerator, dpo_examples, tmp_path / "resumed")

    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    initial = load_causal_lm(tiny[0])[0].state_dict()
    assert not all(torch.equal(a[k], initial[k]) for k in a)  # training did move the weights
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "whole")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "resumed")]
    assert [r["step"] for r in strip] == [1, 2, 3, 4, 5]
    # The trained model is saved for plain transformers.
    saved, _ = load_causal_lm(str(tmp_path / "resumed" / "model"))
    assert all(torch.equal(v, b[k]) for k, v in saved.state_dict().items())


def _checkpointing(model):
    """Whether a layer of ``model`` recomputes its activations (what transformers' is_*_checkpointing reads)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


@pytest.mark.parametrize("keep_attention", [True, False])
def test_gradient_checkpointing_gives_the_same_weights_without_a_warning(tiny, accelerator, dpo_examples, tmp_path,
                                                                         keep_attention):
    loop = LoopConfig(batch_size=4, micro_batch_size=2, lr=1e-3, max_steps=2, save_every=0, warmup_ratio=0.0)
    with OpCounter() as counted:
        stored = _train_dpo(tiny, accelerator, dpo_examples, tmp_path / "stored", loop=loop)
    with warnings.catch_warnings(record=True) as caught, OpCounter() as recounted:
        warnings.simplefilter("always")
        layer = []
        recomputed = _train_dpo(tiny, accelerator, dpo_examples, tmp_path / "recomputed",
                                loop=dataclasses.replace(loop, gradient_checkpointing=True,
                                                         keep_attention=keep_attention),
                                before_step=lambda step, lm: layer.append(
                                    [("forward" in m.__dict__) for m in (lm.model.layers[0].input_layernorm,
                                                                         lm.model.layers[0].mlp)]))
    assert layer == [[True, False]] * 2  # while training: a lean norm, the eager MLP (selpo.lean_body)
    # selpo.recompute: the recomputation runs the attention kernels again (once per layer and micro-batch) unless
    # they are kept
    micro_batches = loop.max_steps * loop.batch_size // loop.micro_batch_size
    again = 0 if keep_attention else micro_batches * stored.config.num_hidden_layers
    assert counted.attention_calls() > 0
    assert recounted.attention_calls() - counted.attention_calls() == again
    assert not [str(w.message) for w in caught if "checkpoint" in str(w.message)]
    assert _checkpointing(recomputed) and not _checkpointing(stored)
    a, b = stored.state_dict(), recomputed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    initial = load_causal_lm(tiny[0])[0].state_dict()
    assert not all(torch.equal(a[k], initial[k]) for k in a)


def test_the_lean_body_trains_to_the_eager_weights_and_leaves_the_model_as_it_was(tiny, accelerator, dpo_examples,
                                                                                 tmp_path):
    loop = LoopConfig(batch_size=4, micro_batch_size=2, lr=1e-3, max_steps=2, save_every=0, warmup_ratio=0.0)
    eager = _train_dpo(tiny, accelerator, dpo_examples, tmp_path / "eager",
                       loop=dataclasses.replace(loop, lean_body=False))
    swapped = []
    lean = _train_dpo(tiny, accelerator, dpo_examples, tmp_path / "lean", loop=loop,
                      before_step=lambda step, lm: swapped.append("forward" in lm.model.layers[0].mlp.__dict__))
    assert swapped == [True, True]
    assert not [n for n, m in lean.named_modules() if "forward" in m.__dict__]
    a, b = eager.state_dict(), lean.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)

def test_training_logs_loss_accuracy_and_schedule(tiny, accelerator, dpo_examples, tmp_path):
    loop = LoopConfig(batch_size=4, micro_batch_size=4, lr=1e-3, max_steps=4, save_every=0, warmup_ratio=0.25)
    _train_dpo(tiny, accelerator, dpo_examples, tmp_path, loop=loop)
    records = read_metrics(tmp_path)
    # One warm-up step, counted from step 1: 1/2; then cosine decay over the 3 others: 0.5 * (1 + cos(pi * k / 3)).
    assert [r["lr"] for r in records] == pytest.approx([0.5e-3, 1e-3, 0.75e-3, 0.25e-3], abs=1e-12)
    assert records[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["accuracy"] > 0.5
    assert {"margin", "chosen_reward", "rejected_reward", "selected", "grad_norm", "epoch"} <= records[0].keys()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-00000004"]


@pytest.mark.parametrize("warmup, total", [(0, 1), (1, 1), (1, 2), (3, 10), (9, 10)])
def test_no_step_of_a_schedule_runs_at_learning_rate_0(warmup, total):
    factors = [warmup_cosine(step, warmup=warmup, total=total) for step in range(total)]
    assert all(0 < f <= 1 for f in factors)
    assert max(factors) == 1 or warmup == total  # the peak is reached right after the warm-up


def test_a_one_step_training_moves_its_model(tiny, accelerator, dpo_examples, tmp_path):
    """A small oracle subset can be one optimizer step; its warm-up step must not run at learning rate 0."""
    loop = LoopConfig(batch_size=4, micro_batch_size=4, lr=1e-3, max_steps=1, save_every=0, warmup_ratio=0.1)
    trained = _train_dpo(tiny, accelerator, dpo_examples, tmp_path, loop=loop)
    assert read_metrics(tmp_path)[0]["lr"] == pytest.approx(0.5e-3)
    initial = load_causal_lm(tiny[0])[0].state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in trained.state_dict().items())


def test_a_training_inside_another_leaves_the_outer_checkpoints_whole(tiny, accelerator, dpo_examples, tmp_path):
    """Guidance's retraining rounds train a reward model inside the policy's ``before_step``, on the process's
    one accelerator: each training's checkpoints hold its own model and optimizer, and the outer one still
    resumes exactly."""
    loop = LoopConfig(batch_size=4, micro_batch_size=4, lr=1e-3, max_steps=3, save_every=2)
    inner_loop = dataclasses.replace(loop, max_steps=1, save_every=0)
    inner_runs = iter(range(2))

    def before_step(step, policy):
        if step == 1:
            other, tokenizer = load_causal_lm(tiny[2])
            train(accelerator, other, tokenizer, DPO(beta=0.5, backend="torch"), dpo_examples[:4], inner_loop,
                  tmp_path / f"inner-{next(inner_runs)}", seed=0)

    whole = _train_dpo(tiny, accelerator, dpo_examples, tmp_path / "whole", loop=loop, before_step=before_step)
    with pytest.raises(Killed):  # killed after step 2, whose checkpoint follows the inner training
        _train_dpo(tiny, accelerator, dpo_examples, tmp_path / "resumed", _kill_after(2), loop=loop,
                   before_step=before_step)
    resumed = _train_dpo(tiny, accelerator, dpo_examples, tmp_path / "resumed", loop=loop, before_step=before_step)
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the outer training did not resume exactly"
    for inner in tmp_path.glob("inner-*"):
        (saved,) = (inner / "checkpoints").glob("step-*")
        assert sorted(p.name for p in saved.glob("*model*")) == ["pytorch_model.bin"]  # its model alone


def test_checkpoint_of_another_configuration_is_not_resumed(tiny, accelerator, dpo_examples, tmp_path, capsys):
    with pytest.raises(Killed):
        _train_dpo(tiny, accelerator, dpo_examples, tmp_path, _kill_after(2), fingerprint="old")
    loop = LoopConfig(batch_size=4, micro_batch_size=2, lr=1e-3, max_steps=1, save_every=0)
    _train_dpo(tiny, accelerator, dpo_examples, tmp_path, fingerprint="new", loop=loop)
    assert "belongs to a different configuration" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny, accelerator, dpo_examples, tmp_path, monkeypatch):
    with pytest.raises(Killed):
        _train_dpo(tiny, accelerator, dpo_examples, tmp_path, _kill_after(2))
    root = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in (root / "step-00000002").iterdir()}

    def crash(self, output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "pytorch_model.bin").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Accelerator, "save_state", crash)  # every training saves through its own accelerator
    with pytest.raises(OSError, match="disk full"):
        _train_dpo(tiny, accelerator, dpo_examples, tmp_path)  # resumes at 2, dies saving step 4
    monkeypatch.undo()
    folder, state = checkpoint.latest(root)
    assert folder.name == "step-00000002" and state["step"] == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    _train_dpo(tiny, accelerator, dpo_examples, tmp_path)  # and the run still finishes from it
    assert checkpoint.latest(root)[1]["step"] == 5
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


def test_too_few_pairs_for_one_batch_is_a_clear_error(tiny, accelerator, dpo_examples, tmp_path):
    with pytest.raises(ValueError, match=r"3 training pairs do not fill one batch of batch_size=4"):
        _train_dpo(tiny, accelerator, dpo_examples[:3], tmp_path)


class NextTokenLikelihood:
    """A method defined outside selpo: plain likelihood of the chosen responses, through a fused op."""

    def loss(self, model, batch):
        hidden, head = response_states(model, batch.pairs)
        cu = batch.pairs.cu_seqlens
        num_pairs = (cu.shape[0] - 1) // 2
        weights = (torch.arange(hidden.shape[0]) < cu[num_pairs]).float()  # chosen tokens only
        logps = linear_logprobs(hidden, head.weight, batch.pairs.targets, backend="torch", **head.op_kwargs())
        loss, _ = weighted_nll(logps, weights, cu, backend="torch")
        return loss, {"nll": loss.detach().reshape(1)}


def test_any_method_object_plugs_into_the_loop(tiny, accelerator, dpo_examples, tmp_path):
    model, tokenizer = load_causal_lm(tiny[0])
    loop = LoopConfig(batch_size=4, micro_batch_size=2, lr=3e-3, max_steps=4, save_every=0, warmup_ratio=0.0)
    # Four pairs and a batch of four: every step sees the same batch, so its loss must fall.
    train(accelerator, model, tokenizer, NextTokenLikelihood(), dpo_examples[:4], loop, tmp_path, seed=0)
    records = read_metrics(tmp_path)
    assert records[-1]["nll"] < records[0]["nll"] - 0.5
    assert all(r["loss"] == r["nll"] for r in records)


def test_two_processes_match_one(tiny, accelerator, tmp_path):
    """Same global batch on 2 gloo processes (1 micro-batch each) as on 1 (2 accumulated): same weights;
    sharded reference log-probs and scoring equal unsharded ones."""
    model_dir, data, other_dir = tiny
    two = tmp_path / "two"
    two.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --multi_gpu starts torchrun-style processes; without a GPU, make_accelerator picks CPU and gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(Path(__file__).parent / "distributed_worker.py"), model_dir, other_dir, data, str(two)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = torch.load(two / "result.pt", weights_only=False)
    single = run_case(accelerator, model_dir, other_dir, data, tmp_path / "one")

    for key, value in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][key], value, atol=2e-5, rtol=1e-4)
    initial = load_causal_lm(model_dir)[0].state_dict()
    assert max((single["weights"][k] - initial[k]).abs().max() for k in initial) > 1e-3  # it did train
    for (a_c, a_r), (b_c, b_r) in zip(sharded["ref_logps"], single["ref_logps"]):
        torch.testing.assert_close(a_c, b_c, atol=1e-6, rtol=0)
        torch.testing.assert_close(a_r, b_r, atol=1e-6, rtol=0)
    assert len(sharded["scored"]) == len(single["scored"]) == 12
    for ((a_scores, a_masks)), ((b_scores, b_masks)) in zip(sharded["scored"], single["scored"]):
        for x, y in zip(a_scores, b_scores):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
        for x, y in zip(a_masks, b_masks):
            assert torch.equal(x, y)
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, LOOP.max_steps + 1))


@pytest.mark.parametrize("kind, fsdp2, calls", [("NO", False, [("ObjectiveModule", "AdamW")]),
                                                ("MULTI_CPU", False, [("ObjectiveModule", "AdamW")]),
                                                ("FSDP", True, [("ObjectiveModule", "AdamW")]),
                                                ("FSDP", False, [("ObjectiveModule",), ("AdamW",)])])
def test_prepare_order_follows_the_sharding(kind, fsdp2, calls):
    """FSDP1 (which cannot run on CPU) gets the module prepared before AdamW is built over it; FSDP2 (which
    refuses two calls) and everything else get both in one call; AdamW holds the prepared module's parameters.
    A module prepared alone comes back with new parameters, as FSDP1 gives it, so AdamW built before that fails.
    FSDP1 on one process is given the frozen modules to leave out (selpo.fsdp1), and the plugin is restored."""
    import copy
    import types

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import ShardingStrategy

    from selpo.trainer import ObjectiveModule, _prepare_with_optimizer

    class Recorder:
        distributed_type, is_fsdp2, seen, num_processes = DistributedType[kind], fsdp2, [], 1
        state = types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(
            ignored_modules=None, sharding_strategy=None, reshard_after_forward=ShardingStrategy.FULL_SHARD))
        left_out = None

        def prepare(self, *objects):
            self.seen.append(tuple(type(o).__name__ for o in objects))
            if len(objects) == 1 and isinstance(objects[0], torch.nn.Module):
                self.left_out = self.state.fsdp_plugin.ignored_modules
                return copy.deepcopy(objects[0])
            return objects if len(objects) > 1 else objects[0]

    recorder = Recorder()
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    module = ObjectiveModule(torch.nn.Sequential(torch.nn.Linear(3, 2), frozen), objective=None)
    module, optimizer = _prepare_with_optimizer(recorder, module, STEPS)
    assert recorder.seen == calls
    assert recorder.left_out == ([frozen] if calls == [("ObjectiveModule",), ("AdamW",)] else None)
    assert recorder.state.fsdp_plugin.ignored_modules is None
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters() if p.requires_grad}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [STEPS.weight_decay, 0.0]


def test_a_saved_model_holds_a_tied_head_once_when_the_state_is_gathered(tiny, accelerator, tmp_path, monkeypatch):
    """FSDP's gathered state holds the tied output embedding as a copy, which ``save_pretrained`` would write as
    a tensor of its own (seen on an H200): the folder must hold what the same model saved without FSDP holds."""
    from safetensors.torch import load_file

    from selpo.trainer import save_model

    lm, tokenizer = load_causal_lm(tiny[0])
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    module = torch.nn.Module()
    module.lm = lm
    monkeypatch.setattr(accelerator, "get_state_dict",
                        lambda m: {k: v.clone() for k, v in m.state_dict(keep_vars=False).items()})
    save_model(accelerator, module, tokenizer, tmp_path / "model")
    saved = load_file(tmp_path / "model" / "model.safetensors")
    original = load_file(Path(tiny[0]) / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
