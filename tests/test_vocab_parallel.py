"""Vocabulary-parallel ops: the head sharded over 2 and 3 CPU processes (gloo, spawned here) at uneven splits,
one shard holding no target; log-probs, scores, the SePO loss and every gradient against the float64 naive
reference and the single-process op; the communication each call makes; and a SePO step of a tiny Llama whose
lm_head is sharded by torch.distributed's tensor-parallel API, against the unsharded model."""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selpo.kernels import ledger, linear_logprobs, linear_selective_loss, token_scores
from selpo.kernels.linear_logprobs.naive import linear_logprobs_naive

V, D, N = 300, 24, 40
# Vocabulary split per world size: uneven, and the first shard of three holds none of the targets.
SPLITS = {2: [113, 187], 3: [10, 139, 151]}
BACKENDS = ["torch", "triton"]


def spawn(fn, world: int, tmp_path):
    """Runs ``fn(rank, world)`` in ``world`` gloo processes; a failure in any is raised here with its traceback."""
    mp.start_processes(_run, args=(fn, world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    errors = sorted(tmp_path.glob("error-*.txt"))
    assert not errors, errors[0].read_text()


def _run(rank, fn, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world)
    except BaseException:
        with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def inputs():
    """The same inputs on every process (float64 masters), targets only in [10, V)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.4
    bias = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5
    targets = torch.randint(10, V, (N,), generator=gen)
    targets[::7] = -100
    grad = torch.randn(N, generator=gen, dtype=torch.float64)
    grad[1::5] = 0.0
    return hidden, weight, bias, targets, grad


def close(got, want, what, tol=2e-5):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: max error {err:.3g}"


def leaves(*tensors):
    return [t.float().clone().requires_grad_() for t in tensors]


def check_linear_logprobs(rank, world):
    hidden, weight, bias, targets, grad = inputs()
    start = sum(SPLITS[world][:rank])
    end = start + SPLITS[world][rank]
    options = {"softcap": 2.5, "temperature": 0.8}
    ref = leaves(hidden, weight, bias)
    want = linear_logprobs_naive(*(t.double() for t in ref[:2]), targets, ref[2].double(), -100, **options)
    (want * grad).sum().backward()
    for backend in BACKENDS:
        h, w, b = leaves(hidden, weight[start:end], bias[start:end])
        with ledger.counting() as forward:
            logp = linear_logprobs(h, w, targets, bias=b, backend=backend, process_group=dist.group.WORLD, **options)
        with ledger.counting() as backward:
            (logp.double() * grad).sum().backward()
        close(logp, want, f"{backend} logp")
        close(h.grad, ref[0].grad, f"{backend} grad_hidden")
        close(w.grad, ref[1].grad[start:end], f"{backend} grad_weight")
        close(b.grad, ref[2].grad[start:end], f"{backend} grad_bias")
        kept, carrying = int((targets != -100).sum()), int(((targets != -100) & (grad != 0)).sum())
        assert [e.bytes for e in forward.entries if e.kind == "comm"] == [4 * kept, 8 * kept]
        assert [e.bytes for e in backward.entries if e.kind == "comm"] == [4 * carrying * D]
        single = linear_logprobs(hidden.float(), weight.float(), targets, bias=bias.float(), backend=backend, **options)
        close(logp, single, f"{backend} against one process")


def check_scores_and_loss(rank, world):
    hidden, weight, bias, targets, _ = inputs()
    start = sum(SPLITS[world][:rank])
    end = start + SPLITS[world][rank]
    other = hidden.flip(0) * 0.5
    want = linear_logprobs_naive(hidden, weight, targets) - linear_logprobs_naive(other, weight, targets)
    cu = torch.tensor([0, 6, 15, 22, 31, 40], dtype=torch.int32)[[0, 1, 2, 4, 5]]
    mask = torch.zeros(N, dtype=torch.bool)
    mask[::2] = True
    for backend in BACKENDS:
        got = token_scores(hidden.float(), weight[start:end].float(), other.float(), weight[start:end].float(), targets,
                           backend=backend, process_group=dist.group.WORLD)
        close(got, want, f"{backend} token_scores")
        ref = leaves(hidden, weight)
        loss_ref, _ = linear_selective_loss(*(t.double() for t in ref), targets, cu, mask=mask, backend="naive")
        loss_ref.backward()
        h, w = leaves(hidden, weight[start:end])
        loss, metrics = linear_selective_loss(h, w, targets, cu, mask=mask, backend=backend,
                                              process_group=dist.group.WORLD)
        (3.0 * loss).backward()
        close(loss, loss_ref, f"{backend} sepo loss")
        close(h.grad, 3.0 * ref[0].grad, f"{backend} loss grad_hidden")
        close(w.grad, 3.0 * ref[1].grad[start:end], f"{backend} loss grad_weight")


def check_tensor_parallel_sepo_step(rank, world):
    """A tiny Llama's lm_head sharded column-wise (a DTensor on a CPU mesh): SePO's loss and every gradient
    equal the unsharded model's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from transformers import LlamaConfig, LlamaForCausalLM

    from selpo.batches import Example, collate
    from selpo.data import TokenizedPair
    from selpo.methods import SePO

    config = LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config)
    sharded = LlamaForCausalLM(config)
    sharded.load_state_dict(reference.state_dict())
    parallelize_module(sharded, init_device_mesh("cpu", (world,)), {"lm_head": ColwiseParallel()})
    gen = torch.Generator().manual_seed(1)
    examples = []
    for i in range(3):
        ids = [torch.randint(1, 301, (n,), generator=gen).tolist() for n in (4, 5 + i, 3 + i)]
        masks = [torch.rand(len(ids[k]), generator=gen) < 0.5 for k in (1, 2)]
        for m in masks:
            m[0] = True
        examples.append(Example(TokenizedPair(ids[0], ids[1], ids[2], row=i), {"mask": tuple(masks)}))
    batch = collate(examples, pad_id=0)
    losses = []
    for model in (reference, sharded):
        loss, _ = SePO(backend="torch").loss(model, batch)
        loss.backward()
        losses.append(loss)
    close(losses[1], losses[0], "loss", 1e-5)
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), sharded.named_parameters()):
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        want = p_ref.grad
        if name == "lm_head.weight":
            rows = -(-301 // world)
            want = want[rank * rows:(rank + 1) * rows]
        close(grad, want, name, 1e-4)


@pytest.mark.parametrize("world", [2, 3])
def test_linear_logprobs_sharded(world, tmp_path):
    spawn(check_linear_logprobs, world, tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_token_scores_and_selective_loss_sharded(world, tmp_path):
    spawn(check_scores_and_loss, world, tmp_path)


def test_tensor_parallel_lm_head_sepo_step(tmp_path):
    spawn(check_tensor_parallel_sepo_step, 2, tmp_path)


def test_naive_backend_refuses_a_process_group():
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialized"):
        linear_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0, 1]), process_group=object())
