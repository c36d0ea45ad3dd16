"""Policy losses as small registered functions with one signature.

    loss_fn(logp, old_logp, adv, mask, cfg, behav_logp=None, ref_logp=None) -> (loss, metrics)

Shapes: logp, old_logp, behav_logp, ref_logp [N, T]; adv [N]; mask [N, T] bool (the kept
tokens: response_mask AND token_mask). ``loss`` is a scalar; ``metrics`` holds detached floats.

Off-policy correction (rollouts come from a stale engine): old_logp is the learner's own policy
at the start of the step; the engine's behaviour log-probs enter only as a truncated importance
weight min(pi_old / pi_behav, C), detached (decoupled PPO).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

Aggregation = Literal["token-mean", "seq-mean-token-mean"]


@dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    aggregation: Aggregation = "token-mean"
    is_cap: float = 2.0  # C in min(pi_old / pi_behav, C)
    kl_coef: float = 0.0  # k3 KL to a reference policy; off by default

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low: must be < 1, got {self.clip_low!r}")
        if self.aggregation not in ("token-mean", "seq-mean-token-mean"):
            raise ValueError(f"aggregation: must be 'token-mean' or 'seq-mean-token-mean', got {self.aggregation!r}")
        if not self.is_cap > 0:
            raise ValueError(f"is_cap: must be > 0, got {self.is_cap!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef: must be >= 0, got {self.kl_coef!r}")


GRPO_CLIP = LossConfig()
GSPO_CLIP = LossConfig(clip_low=3e-4, clip_high=4e-4, aggregation="seq-mean-token-mean")


class PolicyLoss(Protocol):
    def __call__(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        adv: torch.Tensor,
        mask: torch.Tensor,
        cfg: LossConfig,
        behav_logp: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    def deco(fn: PolicyLoss) -> PolicyLoss:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} registered twice")
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in POLICY_LOSSES:
        raise ValueError(f"policy_loss: unknown {name!r}; choose from {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def default_loss_config(name: str) -> LossConfig:
    return GSPO_CLIP if name == "gspo" else GRPO_CLIP


def _check(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp: expected [N, T], got {tuple(logp.shape)}")
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp: shape {tuple(old_logp.shape)} != logp {tuple(logp.shape)}")
    if mask.shape != logp.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected bool {tuple(logp.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if adv.shape != logp.shape[:1]:
        raise ValueError(f"adv: expected [{logp.shape[0]}], got {tuple(adv.shape)}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """Mean of x [N, T] over mask: over all kept tokens, or per sequence then over sequences.

    Sequences (or batches) with no kept token contribute nothing; an all-empty mask gives 0
    that still carries a graph, so backward works on a batch the token level emptied.
    """
    m = mask.to(x.dtype)
    if aggregation == "token-mean":
        return (x * m).sum() / m.sum().clamp_min(1.0)
    per_seq_n = m.sum(dim=1)
    per_seq = (x * m).sum(dim=1) / per_seq_n.clamp_min(1.0)
    has = (per_seq_n > 0).to(x.dtype)
    return (per_seq * has).sum() / has.sum().clamp_min(1.0)


def truncated_is_weight(old_logp: torch.Tensor, behav_logp: torch.Tensor | None, cap: float) -> torch.Tensor:
    """min(pi_old / pi_behav, C) per token, detached; 1 when no behaviour log-probs are given."""
    if behav_logp is None:
        return torch.ones_like(old_logp)
    return torch.exp(old_logp.detach() - behav_logp.detach()).clamp(max=cap)


def _kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    # Unbiased, always >= 0 estimator of KL(pi || ref) from samples of pi.
    d = ref_logp.detach() - logp
    return torch.exp(d) - d - 1.0


@register_policy_loss("grpo")
def grpo_loss(logp, old_logp, adv, mask, cfg, behav_logp=None, ref_logp=None):
    """Token-level PPO-clip with asymmetric clip [1 - clip_low, 1 + clip_high].

    per token: w_t * max(-A r_t, -A clip(r_t)), r_t = exp(logp - old_logp), w_t truncated IS.
    """
    _check(logp, old_logp, adv, mask)
    a = adv.detach().to(logp.dtype).unsqueeze(1)
    ratio = torch.exp(logp - old_logp.detach())
    clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(-a * ratio, -a * clipped)
    w = truncated_is_weight(old_logp, behav_logp, cfg.is_cap)
    per_token = w * pg
    if cfg.kl_coef > 0 and ref_logp is not None:
        per_token = per_token + cfg.kl_coef * _kl_k3(logp, ref_logp)
    loss = masked_mean(per_token, mask, cfg.aggregation)
    with torch.no_grad():
        m = mask
        n = max(int(m.sum()), 1)
        clipped_frac = float(((-a * clipped > -a * ratio) & m).sum()) / n
        metrics = {
            "pg_clipfrac": clipped_frac,
            "ratio_mean": float((ratio * m).sum()) / n,
            "is_weight_mean": float((w * m).sum()) / n,
            "approx_kl": float(((old_logp - logp) * m).sum()) / n,
        }
    return loss, metrics


@register_policy_loss("gspo")
def gspo_loss(logp, old_logp, adv, mask, cfg, behav_logp=None, ref_logp=None):
    """Sequence-level PPO-clip (GSPO): s_i = exp(mean over kept tokens of logp - old_logp).

    per sequence: w_i * max(-A_i s_i, -A_i clip(s_i)); the truncated IS weight is taken at the
    same sequence level, w_i = min(exp(mean over kept tokens of old_logp - behav_logp), C).
    Sequences with no kept token are left out; the result is their mean over sequences.
    """
    _check(logp, old_logp, adv, mask)
    m = mask.to(logp.dtype)
    n_tok = m.sum(dim=1)
    has = n_tok > 0
    denom = n_tok.clamp_min(1.0)
    log_s = ((logp - old_logp.detach()) * m).sum(dim=1) / denom
    s = torch.exp(log_s)
    a = adv.detach().to(logp.dtype)
    clipped = s.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_seq = torch.maximum(-a * s, -a * clipped)
    if behav_logp is None:
        w = torch.ones_like(s)
    else:
        w = torch.exp(((old_logp - behav_logp).detach() * m).sum(dim=1) / denom).clamp(max=cfg.is_cap)
    per_seq = w * per_seq
    if cfg.kl_coef > 0 and ref_logp is not None:
        per_seq = per_seq + cfg.kl_coef * (_kl_k3(logp, ref_logp) * m).sum(dim=1) / denom
    hasf = has.to(logp.dtype)
    loss = (per_seq * hasf).sum() / hasf.sum().clamp_min(1.0)
    with torch.no_grad():
        k = max(int(has.sum()), 1)
        metrics = {
            "pg_clipfrac": float(((-a * clipped > -a * s) & has).sum()) / k,
            "ratio_mean": float((s * hasf).sum()) / k,
            "is_weight_mean": float((w * hasf).sum()) / k,
            "approx_kl": float(((old_logp - logp) * mask).sum()) / max(int(mask.sum()), 1),
        }
    return loss, metrics
