"""The DeepSpeed learner: one PPO-clip step on a batch of kept samples, with token-level D3S.

Step anatomy (token_pass="compact", the default):
  1. no-grad forward over this rank's rows -> old log-probs and per-token entropy;
  2. token mask over the whole batch (entropies are all-gathered, so pool="batch" ranks across
     ranks exactly as on one rank);
  3. gradient forward/backward only over rows with a kept token, cut after the last kept
     position, so the token level saves learner time and not only tokens (DESIGN §5).
With one update per batch, old_logp is the policy at the start of the step.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from learner import distributed as D
from learner.batch import LearnerBatch
from learner.config import LearnerConfig
from learner.logits import logprobs_and_entropy
from learner.loss import get_policy_loss
from selector.presets import Preset, select_tokens

log = logging.getLogger(__name__)


def _lr_lambda(cfg: LearnerConfig, total_steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        p = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def _disable_dropout(model: torch.nn.Module) -> None:
    # With dropout on, the gradient pass and the no-grad pass of the same weights disagree and
    # the PPO ratio is not 1 at the start of a step; RL trainers turn it off.
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0


class LearnerEngine:
    """Wraps a Hugging Face causal LM in a DeepSpeed engine and takes D3S/GRPO steps."""

    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig, total_steps: int) -> None:
        import deepspeed

        self.cfg = cfg
        self.device = D.pick_device(cfg.device)
        D.init_distributed(self.device, cfg.dist_timeout_s, cfg.cpu_shm_comm)
        self.rank, self.world = D.rank(), D.world_size()
        self.bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and self.device.type == "cuda")
        _disable_dropout(model)
        self.loss_fn = get_policy_loss(cfg.policy_loss)
        self.loss_cfg = cfg.loss_config()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total_steps))
        ds_config: dict[str, Any] = {
            # The learner forms its own batches; DeepSpeed sees one micro-batch per step.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_force_ds_cpu_optimizer": False,
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
        )
        self.steps_done = 0
        log.info("learner ready: rank %d/%d device=%s zero=%d bf16=%s loss=%s token_pass=%s",
                 self.rank, self.world, self.device, cfg.zero_stage, self.bf16, cfg.policy_loss, cfg.token_pass)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _forward(self, batch: LearnerBatch, cut: int | None, with_entropy: bool):
        """logp [n, cut] (and entropy) of the shifted targets, over input columns [:cut + 1]."""
        width = batch.input_ids.shape[1] if cut is None else cut + 1
        ids = batch.input_ids[:, :width]
        am = batch.attention_mask()[:, :width]
        logits = self.engine(input_ids=ids, attention_mask=am).logits[:, :-1]
        return logprobs_and_entropy(logits, ids[:, 1:], self.cfg.temperature, self.cfg.entropy_chunk_rows,
                                    with_entropy=with_entropy)

    def _shard(self, batch: LearnerBatch) -> tuple[LearnerBatch, list[int]]:
        parts = torch.tensor_split(torch.arange(batch.size), self.world)
        return batch.rows(parts[self.rank]), [len(p) for p in parts]

    def train_step(
        self,
        batch: LearnerBatch,
        preset: Preset,
        token_ratio: float,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """One optimizer step on ``batch`` (identical on every rank; each takes its shard)."""
        t0 = time.perf_counter()
        self.engine.train()
        local, n_rows = self._shard(batch)
        local = local.to(self.device)
        resp = local.target_mask()
        behav = local.behav_logp[:, 1:]
        adv = local.advantages

        compact = self.cfg.token_pass == "compact"
        if compact:
            with torch.no_grad():
                old_logp, ent = self._forward(local, None, with_entropy=True)
        else:
            logp_full, ent = self._forward(local, None, with_entropy=True)
            old_logp = logp_full.detach()

        # token level, ranked over the whole batch
        all_ent = D.all_gather_rows(ent.float(), n_rows)
        all_resp = D.all_gather_rows(resp, n_rows)
        all_adv = D.all_gather_rows(adv.float(), n_rows)
        mask_all = select_tokens(preset, all_adv.cpu(), all_ent.cpu(), all_resp.cpu(), token_ratio, generator)
        lo = sum(n_rows[: self.rank])
        mask = mask_all[lo : lo + n_rows[self.rank]].to(self.device) & resp

        if compact:
            rows = torch.nonzero(mask.any(dim=1)).flatten()
            if rows.numel() == 0:
                # Nothing kept here: a zero loss on one row still joins the gradient all-reduce.
                rows = torch.zeros(1, dtype=torch.long, device=self.device)
            cols = mask[rows].any(dim=0).nonzero()
            cut = int(cols.max()) + 1 if cols.numel() else 1
            sub = local.rows(rows)
            logp, _ = self._forward(sub, cut, with_entropy=False)
            g_mask, g_old, g_behav, g_adv = mask[rows, :cut], old_logp[rows, :cut], behav[rows, :cut], adv[rows]
            fwd_tokens = int(sub.seq_lengths.clamp(max=cut + 1).sum())
        else:
            logp, g_mask, g_old, g_behav, g_adv = logp_full, mask, old_logp, behav, adv
            fwd_tokens = int(local.seq_lengths.sum())

        loss, lm = self.loss_fn(logp, g_old, g_adv, g_mask, self.loss_cfg, behav_logp=g_behav)
        local_den = self._denominator(g_mask)
        kept_tok, valid_tok, glob_den, ent_sum, loss_sum, fwd_sum = D.all_reduce_sum(
            [float(mask.sum()), float(resp.sum()), local_den, float((ent * resp).sum()),
             float(loss.detach()) * local_den, float(fwd_tokens)], self.device)
        # DeepSpeed averages gradients over ranks; this weighting turns that average into the
        # loss over the whole batch.
        scale = self.world * local_den / glob_den if glob_den > 0 else 0.0
        self.engine.backward(loss * scale)
        self.engine.step()
        self.steps_done += 1
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "loss": loss_sum / glob_den if glob_den > 0 else 0.0,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "entropy": ent_sum / max(valid_tok, 1.0),
            "samples_in": float(batch.size),
            "tokens_valid": valid_tok,
            "tokens_kept": kept_tok,
            "tokens_forward": fwd_sum,
            "learner_seconds": time.perf_counter() - t0,
        }
        metrics.update({k: float(v) for k, v in lm.items()})
        return metrics

    def _denominator(self, mask: torch.Tensor) -> float:
        """How many units the loss averages over: kept tokens, or sequences with a kept token."""
        if self.cfg.policy_loss == "grpo" and self.loss_cfg.aggregation == "token-mean":
            return float(mask.sum())
        return float(mask.any(dim=1).sum())

    # -- weights and checkpoints -------------------------------------------------------------

    def state_dict_cpu(self) -> dict[str, torch.Tensor]:
        """Full weights on CPU (gathered across ranks under ZeRO-3), for publishing."""
        module = self.engine.module
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}

    def save_checkpoint(self, directory: Path, step: int, client_state: dict[str, Any]) -> None:
        state = dict(client_state, step=step, torch_rng=torch.get_rng_state())
        self.engine.save_checkpoint(str(directory), tag=f"step{step:07d}", client_state=state)
        log.info("checkpoint saved: %s (step %d)", directory, step)

    def load_checkpoint(self, directory: Path) -> dict[str, Any] | None:
        """Resume from the latest tag in ``directory``; None when there is nothing to resume."""
        if not (Path(directory) / "latest").exists():
            return None
        path, state = self.engine.load_checkpoint(str(directory))
        if path is None:
            return None
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        self.steps_done = int(state.get("step", 0))
        log.info("resumed from %s at step %d", path, self.steps_done)
        return state
