"""What the ops take from a model at the response positions (hidden states, the output head), and the
per-token log-probs of many pairs computed from them over all processes. Never full logits."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from .batches import split_packed
from .body import body_states, layout_of
from .data import PairBatch, TokenizedPair, collate_pairs
from .distributed import map_batches
from .head import LogitHead, read_head
from .kernels import linear_logprobs


def response_states(model: torch.nn.Module, pairs: PairBatch) -> tuple[torch.Tensor, LogitHead]:
    """([N, D] hidden states at the positions predicting each response token, the model's head).

    The body runs in the batch's token layout (``selpo.body.body_states``).

    Every op call passes ``head.weight`` and ``**head.op_kwargs()``, so the log-probs are the model's own,
    whatever transform its head applies (``selpo.head``). Under autocast (bf16 mixed precision) the hidden
    states and the head's weight and bias are cast to the autocast dtype, so the fused op runs its matrix
    products in bf16 as the model's own layers do (a custom op is not autocast by itself, and a Llama's
    residual stream, hence its last hidden states, stays float32); otherwise the head is cast to the hidden
    states' dtype. The casts are differentiable: gradients reach the float32 parameters.
    """
    hidden = body_states(model, pairs)[pairs.positions]
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        hidden = hidden.to(torch.get_autocast_dtype(device))
    return hidden, read_head(model).to(hidden.dtype)


@torch.no_grad()
def pair_logps(accelerator: Accelerator, model, pairs: list[TokenizedPair], *, pad_id: int, batch_size: int,
               backend: str = "auto", desc: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair, float32 CPU (chosen [len(chosen_ids)], rejected [len(rejected_ids)]) log-probs of the responses.

    Runs under the accelerator's autocast (as training does), sharded over the processes, the body in the layout
    chosen for ``model`` (``selpo.body.layout_of``); ``desc`` names the pass on a progress bar.
    """
    model.eval()

    def logps(chunk: list[TokenizedPair]):
        batch = collate_pairs(chunk, pad_id, layout_of(model)).to(accelerator.device)
        with accelerator.autocast():
            hidden, head = response_states(model, batch)
            values = linear_logprobs(hidden, head.weight, batch.targets, backend=backend, **head.op_kwargs())
        return split_packed(values.float().cpu(), batch.cu_seqlens.cpu())

    return map_batches(accelerator, pairs, batch_size, logps, desc=desc)
