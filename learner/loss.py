"""Policy losses: a registry of PPO-clip variants, each owning its typed config and aggregation.

A registered loss answers two questions, so the learner never branches on a loss name:

    loss.units(mask)                       -> how many units the batch loss averages over
    loss.summed(logp, old_logp, adv, mask) -> the loss summed over those units (+ statistics)

The batch loss is ``summed / units``. Splitting a batch into micro-batches (whole rows each) and
dividing every micro-batch's ``summed`` by the units of the whole batch gives exactly the same
gradient, which is how the learner accumulates gradients.

Shapes: logp, old_logp, behav_logp [N, T]; adv [N]; mask [N, T] bool (the kept tokens:
response_mask AND token_mask).

Off-policy correction (rollouts come from a stale engine): old_logp is the learner's own policy
at the start of the step; the engine's behaviour log-probs enter only as a truncated importance
weight min(pi_old / pi_behav, C), detached (decoupled PPO).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import torch

Aggregation = Literal["token-mean", "seq-mean-token-mean"]


class LossSettings(Protocol):
    """What a loss reads from its config (``learner/config.py`` defines the typed variants,
    with their defaults and bounds; a variant may add fields, e.g. GRPO's ``aggregation``)."""

    type: str
    is_cap: float
    clip_low: float
    clip_high: float


class GRPOSettings(LossSettings, Protocol):
    """GRPO's settings add how the token losses are averaged."""

    aggregation: Aggregation


@dataclass
class LossSum:
    """A loss summed over its units, and statistics as (sum, count) pairs to merge across
    micro-batches and ranks before dividing."""

    total: torch.Tensor  # scalar, differentiable w.r.t. logp
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)


class PolicyLoss(ABC):
    """A registered loss bound to its config."""

    name: ClassVar[str]

    def __init__(self, cfg: LossSettings) -> None:
        if getattr(cfg, "type", None) != self.name:
            raise ValueError(
                f"loss: {self.name} needs a {self.name} config, got one of type "
                f"{getattr(cfg, 'type', None)!r}"
            )
        self.cfg = cfg

    @abstractmethod
    def units(self, mask: torch.Tensor) -> int:
        """How many units (tokens or sequences) the loss of a batch with kept tokens ``mask``
        [N, T] averages over."""

    @abstractmethod
    def summed(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        adv: torch.Tensor,
        mask: torch.Tensor,
        behav_logp: torch.Tensor | None = None,
    ) -> LossSum:
        """The loss summed over this batch's units; rows must be whole sequences."""

    def __call__(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        adv: torch.Tensor,
        mask: torch.Tensor,
        behav_logp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch loss (a scalar; 0 with a graph when nothing is kept) and mean statistics."""
        part = self.summed(logp, old_logp, adv, mask, behav_logp)
        loss = part.total / max(self.units(mask), 1)
        return loss, {k: s / max(c, 1.0) for k, (s, c) in part.stats.items()}


POLICY_LOSSES: dict[str, type[PolicyLoss]] = {}


def register_policy_loss(name: str) -> Callable[[type[PolicyLoss]], type[PolicyLoss]]:
    """Class decorator: register a loss under ``name``, the ``type`` its config carries."""

    def deco(cls: type[PolicyLoss]) -> type[PolicyLoss]:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} registered twice")
        cls.name = name
        POLICY_LOSSES[name] = cls
        return cls

    return deco


def get_policy_loss(cfg: LossSettings) -> PolicyLoss:
    """The loss a config selects (``learner.config.default_loss_config`` gives a bare name's)."""
    name = getattr(cfg, "type", None)
    if name not in POLICY_LOSSES:
        raise ValueError(f"loss.type: unknown {name!r}; choose from {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name](cfg)


def _check(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp: expected [N, T], got {tuple(logp.shape)}")
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp: shape {tuple(old_logp.shape)} != logp {tuple(logp.shape)}")
    if mask.shape != logp.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"mask: expected bool {tuple(logp.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    if adv.shape != logp.shape[:1]:
        raise ValueError(f"adv: expected [{logp.shape[0]}], got {tuple(adv.shape)}")


def truncated_is_weight(
    old_logp: torch.Tensor, behav_logp: torch.Tensor | None, cap: float
) -> torch.Tensor:
    """min(pi_old / pi_behav, C) per token [N, T], detached; 1 when no behaviour log-probs are given."""
    if behav_logp is None:
        return torch.ones_like(old_logp)
    return torch.exp(old_logp.detach() - behav_logp.detach()).clamp(max=cap)


def _stat(x: torch.Tensor, where: torch.Tensor) -> tuple[float, float]:
    """(sum of x over where, count of where), detached."""
    return float((x.detach() * where).sum()), float(where.sum())


def _seq_units(mask: torch.Tensor) -> int:
    return int(mask.any(dim=1).sum())


@register_policy_loss("grpo")
class GRPOLoss(PolicyLoss):
    """Token-level PPO-clip with asymmetric clip [1 - clip_low, 1 + clip_high].

    per token: w_t * max(-A r_t, -A clip(r_t)), r_t = exp(logp - old_logp), w_t truncated IS;
    averaged over kept tokens (token-mean) or per sequence, then over sequences.
    """

    cfg: GRPOSettings

    def units(self, mask: torch.Tensor) -> int:
        if self.cfg.aggregation == "token-mean":
            return int(mask.sum())
        return _seq_units(mask)

    def summed(self, logp, old_logp, adv, mask, behav_logp=None) -> LossSum:
        _check(logp, old_logp, adv, mask)
        a = adv.detach().to(logp.dtype).unsqueeze(1)
        ratio = torch.exp(logp - old_logp.detach())
        clipped = ratio.clamp(1.0 - self.cfg.clip_low, 1.0 + self.cfg.clip_high)
        per_token = torch.maximum(-a * ratio, -a * clipped)
        w = truncated_is_weight(old_logp, behav_logp, self.cfg.is_cap)
        m = mask.to(logp.dtype)
        weighted = w * per_token * m
        if self.cfg.aggregation == "token-mean":
            total = weighted.sum()
        else:
            total = (weighted.sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).sum()
        with torch.no_grad():
            stats = {
                "pg_clipfrac": _stat((-a * clipped > -a * ratio).to(m.dtype), m),
                "ratio_mean": _stat(ratio, m),
                "is_weight_mean": _stat(w, m),
                "approx_kl": _stat(old_logp - logp, m),
            }
        return LossSum(total, stats)


@register_policy_loss("gspo")
class GSPOLoss(PolicyLoss):
    """Sequence-level PPO-clip (GSPO): s_i = exp(mean over kept tokens of logp - old_logp).

    per sequence: w_i * max(-A_i s_i, -A_i clip(s_i)); the truncated IS weight is taken at the
    same sequence level, w_i = min(exp(mean over kept tokens of old_logp - behav_logp), C).
    Sequences with no kept token are left out; the loss is the mean over the others.
    """

    cfg: LossSettings

    def units(self, mask: torch.Tensor) -> int:
        return _seq_units(mask)

    def summed(self, logp, old_logp, adv, mask, behav_logp=None) -> LossSum:
        _check(logp, old_logp, adv, mask)
        m = mask.to(logp.dtype)
        denom = m.sum(dim=1).clamp_min(1.0)
        has = (m.sum(dim=1) > 0).to(logp.dtype)
        s = torch.exp(((logp - old_logp.detach()) * m).sum(dim=1) / denom)
        a = adv.detach().to(logp.dtype)
        clipped = s.clamp(1.0 - self.cfg.clip_low, 1.0 + self.cfg.clip_high)
        per_seq = torch.maximum(-a * s, -a * clipped)
        if behav_logp is None:
            w = torch.ones_like(s)
        else:
            w = torch.exp(((old_logp - behav_logp).detach() * m).sum(dim=1) / denom).clamp(
                max=self.cfg.is_cap
            )
        total = (w * per_seq * has).sum()
        with torch.no_grad():
            stats = {
                "pg_clipfrac": _stat((-a * clipped > -a * s).to(m.dtype), has),
                "ratio_mean": _stat(s, has),
                "is_weight_mean": _stat(w, has),
                "approx_kl": _stat(old_logp - logp, m),
            }
        return LossSum(total, stats)
