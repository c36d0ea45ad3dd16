"""One micro-batch's forward, scoring only the targets that are read.

The backbone runs over every input position (attention needs them all), but the learner reads
log-probs and entropies only at some targets: the response tokens in the no-grad pass, the kept
tokens in the gradient pass. [V]-wide logits anywhere else would be computed only to be masked
out; on SmolLM2 the output layer is a fifth of the model's multiply-adds, and the float32
softmax over its 49k entries costs about as much again. So the output layer sees only the
hidden states of the needed positions (a pre-hook on the model's output embeddings), and the
softmax runs over those rows alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from learner.batch import LearnerBatch, MicroBatch
from learner.logits import logprobs_and_entropy
from learner.packing import pack_rows


@contextmanager
def output_rows(module: torch.nn.Module, flat: torch.Tensor) -> Iterator[list[bool]]:
    """While open, the output layer of ``module`` sees only the hidden states at flat
    positions ``flat`` (of [batch * seq]), as one row [1, len(flat), hidden], so the forward's
    logits are [1, len(flat), V]. Yields a list that is non-empty once the layer ran; a model
    without output embeddings to hook gets its forward unchanged."""
    getter = getattr(module, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    ran: list[bool] = []
    if head is None:
        yield ran
        return

    def pick(_mod, args):
        ran.append(True)
        h = args[0]
        return (h.reshape(-1, h.shape[-1])[flat].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield ran
    finally:
        handle.remove()


def score_targets(
    forward: Callable[..., object],
    module: torch.nn.Module,
    batch: LearnerBatch,
    mb: MicroBatch,
    need: torch.Tensor,
    fill: torch.Tensor,
    temperature: float,
    chunk_rows: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logp [m, width - 1] (and entropy) of the shifted targets ``need`` [m, width - 1] bool,
    over input columns [:width] of micro-batch ``mb`` (``batch``: its rows); elsewhere logp is
    ``fill`` (detached, same shape) and entropy 0. Packed rows come back in the same per-row
    view.

    ``forward(**inputs)`` runs ``module`` (the DeepSpeed engine around it) and returns an
    output with ``.logits``; where the output layer could not be hooked they are all the
    positions' and the needed ones are picked from them.
    """
    if mb.pack is not None:
        ids, pos, index, _ = pack_rows(batch.input_ids, mb.pack, mb.width)
        inputs = {"input_ids": ids, "position_ids": pos}
        flat = index[need]  # packed position of each needed target's input column
    else:
        ids = batch.input_ids[:, : mb.width]
        inputs = {"input_ids": ids, "attention_mask": batch.attention_mask()[:, : mb.width]}
        r, c = need.nonzero(as_tuple=True)
        flat = r * mb.width + c
    labels = ids.reshape(-1)[flat + 1]  # input column c predicts the token at c + 1
    with output_rows(module, flat) as picked:
        logits = forward(**inputs, use_cache=False).logits
    if not picked:
        logits = logits.reshape(-1, logits.shape[-1])[flat][None]
    logp, ent = logprobs_and_entropy(
        logits, labels[None], temperature, chunk_rows, with_entropy=with_entropy
    )
    logp = fill.detach().to(logp.dtype).masked_scatter(need, logp[0])
    if with_entropy:
        ent = torch.zeros_like(logp).masked_scatter(need, ent[0])
    return logp, ent
