"""Chunked log-probs and entropies: values and gradients equal the plain log-softmax ones."""

from __future__ import annotations

import pytest
import torch

from learner.logits import logprobs_and_entropy


def reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    lp = torch.log_softmax(logits.float() / temperature, -1)
    return lp.gather(2, labels.unsqueeze(2)).squeeze(2), -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 1000])
def test_values_and_gradient_match_log_softmax(temperature, chunk_rows):
    g = torch.Generator().manual_seed(chunk_rows)
    logits = (torch.randn(3, 5, 11, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 11, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)
    logp, ent = logprobs_and_entropy(logits, labels, temperature, chunk_rows)
    (grad,) = torch.autograd.grad((logp * weights).sum(), logits)
    ref_lp, ref_ent = reference(logits, labels, temperature)
    (ref_grad,) = torch.autograd.grad((ref_lp * weights).sum(), logits)
    assert torch.allclose(logp, ref_lp, atol=1e-6)
    assert torch.allclose(ent, ref_ent, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert logp.requires_grad and not ent.requires_grad


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda x: logprobs_and_entropy(x, labels, 0.8, 4, False)[0], (logits,)
    )


def test_bf16_logits_give_float32_results_and_bf16_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=g).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 9, (2, 4), generator=g)
    logp, ent = logprobs_and_entropy(logits, labels, chunk_rows=3)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    logp.sum().backward()
    ref_lp, _ = reference(logits.detach(), labels, 1.0)
    assert torch.allclose(logp, ref_lp, atol=1e-5)
    assert logits.grad.dtype == torch.bfloat16


def test_without_entropy_and_empty():
    logp, ent = logprobs_and_entropy(
        torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), with_entropy=False
    )
    assert ent is None and logp.shape == (2, 3)
    logp, ent = logprobs_and_entropy(torch.randn(2, 0, 4), torch.zeros(2, 0, dtype=torch.long))
    assert logp.shape == (2, 0) and ent.shape == (2, 0)


def test_shape_error_names_the_arguments():
    with pytest.raises(ValueError, match="^logits/labels:"):
        logprobs_and_entropy(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
