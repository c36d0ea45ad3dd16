"""The DeepSpeed learner: one PPO-clip step on a batch of kept samples, with token-level D3S.

Step anatomy:
  1. no-grad pass over this rank's rows, by micro-batches -> old log-probs and per-token entropy
     (skipped when every response token is kept, as in GRPO: step 3 gives both itself);
  2. token mask over the whole batch (entropies are all-gathered, so pool="batch" ranks across
     ranks exactly as on one rank);
  3. gradient pass by micro-batches, each backward adding to the same gradients, then ONE
     optimizer step. With token_pass="compact" it runs only rows with a kept token, each
     micro-batch cut after its last kept position, so the token level saves learner time and
     not only tokens.
In both passes the output layer and the softmax run only at the targets that are read (the
response tokens in 1, the kept tokens in 3): the [V]-wide logits of prompt positions and of
dropped tokens are never computed (learner/forward.py).
Micro-batches hold at most ``micro_batch_tokens`` padded tokens, so memory is bounded by the
budget and never by the batch: logits exist for one micro-batch at a time. Rows go longest first,
so a micro-batch pads to rows of similar length; with ``packing`` they run end to end in shared
rows instead (learner/packing.py) and only the shared rows' tails pad.
With one update per batch, old_logp is the policy at the start of the step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from learner import distributed as D
from learner.batch import (
    LearnerBatch,
    MicroBatch,
    last_kept_width,
    plan_micro_batches,
    plan_packed_micro_batches,
)
from learner.config import LearnerConfig
from learner.forward import score_targets
from learner.loss import get_policy_loss
from learner.packing import packing_mismatch
from learner.prepare import disable_dropout, enable_checkpointing
from learner.weights import ZeroShardedWeights, host_weights, live_weights
from selector.presets import Preset, select_tokens
from services.policy.lora import apply_lora, save_adapter_config

log = logging.getLogger(__name__)

# Relative logit difference a model may show between packed and padded forwards: float32
# rounding of differently shaped matmuls is ~1e-7; bf16 keeps 8 bits of mantissa.
PACKING_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _lr_lambda(cfg: LearnerConfig, schedule_steps: int):
    """The LR factor at each optimizer step: linear warm-up, then constant or cosine decay that
    reaches ``min_lr_ratio`` at ``schedule_steps`` (the run's schedule horizon) and holds it, so
    a run extended past its horizon trains on at the final LR."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, schedule_steps - cfg.warmup_steps)
        p = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


class LearnerEngine:
    """Wraps a Hugging Face causal LM in a DeepSpeed engine and takes D3S/GRPO steps."""

    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig, schedule_steps: int) -> None:
        """``schedule_steps``: the LR schedule's horizon (``train.schedule_steps``, which is
        ``train.total_steps`` unless a resumed run kept its first horizon)."""
        import deepspeed

        self.cfg = cfg
        self.device = D.pick_device(cfg.device)
        D.init_distributed(self.device, cfg.dist_timeout_s, cfg.cpu_shm_comm)
        self.rank, self.world = D.rank(), D.world_size()
        self.bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and self.device.type == "cuda")
        disable_dropout(model)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        # LoRA after the base's dropout went off (the adapter keeps learner.lora.dropout); only
        # what trains enters the optimizer, so the frozen base has no state there
        model = apply_lora(model, cfg.lora) if cfg.lora is not None else model
        self.sync_dtype = torch.bfloat16 if self.bf16 else torch.float32  # see set_sync_dtype
        self.loss_fn = get_policy_loss(cfg.loss)
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, schedule_steps))
        ds_config: dict[str, Any] = {
            # The learner forms its own micro-batches (a varying number per step) and marks the
            # last one as the accumulation boundary itself, so DeepSpeed's own count stays 1.
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
        if cfg.packing:
            self._check_packing()
        log.info(
            "learner ready: rank %d/%d device=%s zero=%d bf16=%s loss=%s token_pass=%s micro_batch_tokens=%s "
            "gradient_checkpointing=%s packing=%s",
            self.rank,
            self.world,
            self.device,
            cfg.zero_stage,
            self.bf16,
            cfg.loss.type,
            cfg.token_pass,
            cfg.micro_batch_tokens,
            cfg.gradient_checkpointing,
            cfg.packing,
        )

    def _check_packing(self) -> None:
        """Refuse ``learner.packing`` unless the model gives packed rows their padded logits."""
        name = type(self.module).__name__
        vocab = int(getattr(getattr(self.module, "config", None), "vocab_size", 0) or 0)
        try:
            diff = packing_mismatch(lambda **kw: self.engine(**kw).logits, vocab or 2, self.device)
        except (TypeError, ValueError) as e:
            raise ValueError(f"learner.packing: {name} cannot run packed rows ({e})") from e
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        if not diff <= PACKING_TOLERANCE[dtype]:
            raise ValueError(
                f"learner.packing: {name} does not keep packed rows apart (relative logit "
                f"difference {diff:.2e} from padded rows); set learner.packing: false"
            )

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _forward(self, batch, mb, need, fill, with_entropy):
        """logp (and entropy) [m, width - 1] of the targets ``need`` of micro-batch ``mb``
        (``batch``: its rows), ``fill`` elsewhere (learner/forward.py)."""
        cfg = self.cfg
        return score_targets(
            self.engine,
            self.module,
            batch,
            mb,
            need,
            fill,
            cfg.temperature,
            cfg.entropy_chunk_rows,
            with_entropy,
        )

    def _plan(self, widths: torch.Tensor) -> list[MicroBatch]:
        if self.cfg.packing:
            return plan_packed_micro_batches(
                widths, self.cfg.micro_batch_tokens, self.cfg.packing_row_tokens
            )
        return plan_micro_batches(widths, self.cfg.micro_batch_tokens)

    @staticmethod
    def _positions(sub: LearnerBatch, mb: MicroBatch) -> tuple[int, int]:
        """(input positions the forward of ``mb`` runs, how many hold a real token)."""
        if not mb.live:
            return 0, 0
        if mb.pack is not None:
            return mb.padded_tokens, int(mb.pack.lengths.sum())
        return mb.padded_tokens, int(sub.seq_lengths.clamp(max=mb.width).sum())

    def _shard(self, batch: LearnerBatch) -> tuple[LearnerBatch, list[int]]:
        parts = torch.tensor_split(torch.arange(batch.size), self.world)
        return batch.rows(parts[self.rank]), [len(p) for p in parts]

    def _in_step(self, plans: list[MicroBatch]) -> list[MicroBatch]:
        """Pad ``plans`` with placeholders to the largest count on any rank (at least one).

        ZeRO-2 reduces gradients in every backward and ZeRO-3 gathers parameters in every
        forward, so ranks must make the same number of calls even when their shards differ.
        """
        count = len(plans)
        if self.world > 1:
            counts = D.all_gather_rows(torch.tensor([count], device=self.device), [1] * self.world)
            count = int(counts.max())
        filler = MicroBatch(torch.zeros(1, dtype=torch.long), 2, live=False)
        return plans + [filler] * (max(count, 1) - len(plans))

    def _score(
        self, local: LearnerBatch, resp: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """No-grad pass by micro-batches: old log-probs and entropies [n, L-1] of the response
        targets ``resp`` (0 elsewhere: nothing reads them), and [input positions run, real
        tokens among them]."""
        n, width = local.input_ids.shape
        old_logp = torch.zeros(n, width - 1, device=self.device)
        ent = torch.zeros(n, width - 1, device=self.device)
        plans = self._in_step(self._plan(local.seq_lengths.cpu()))
        run = [0, 0]
        with torch.no_grad():
            for mb in plans:
                rows = mb.rows.to(self.device)
                sub = local.rows(rows)
                need = resp[rows, : mb.width - 1] & mb.live
                zero = torch.zeros(need.shape, device=self.device)
                logp, e = self._forward(sub, mb, need, zero, with_entropy=True)
                if mb.live:
                    old_logp[rows, : mb.width - 1] = logp
                    ent[rows, : mb.width - 1] = e
                run = [a + b for a, b in zip(run, self._positions(sub, mb), strict=True)]
        return old_logp, ent, run

    def _gradient_plan(self, local: LearnerBatch, mask: torch.Tensor) -> list[MicroBatch]:
        """Micro-batches of the gradient pass: compact runs the rows with a kept token up to
        their last kept target; full runs every row to its end."""
        if self.cfg.token_pass == "full":
            return self._plan(local.seq_lengths.cpu())
        mask = mask.cpu()
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        plans = self._plan(last_kept_width(mask)[rows])
        return [replace(p, rows=rows[p.rows]) for p in plans]

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
        # Every response token kept (GRPO, or a token ratio of 1: select_tokens reads no
        # entropy): no no-grad pass. With one update per batch the old policy is the one the
        # gradient pass runs, so that pass gives the old log-probs and entropies itself.
        scored = preset.token_level != "none" and token_ratio < 1.0
        if scored:
            old_logp, ent, score_run = self._score(local, resp)
        else:
            old_logp = torch.zeros(resp.shape, device=self.device)
            ent, score_run = torch.zeros_like(old_logp), [0, 0]
        mask = self._token_mask(local, resp, ent, n_rows, preset, token_ratio, generator)

        (glob_units,) = D.all_reduce_sum([float(self.loss_fn.units(mask))], self.device)
        # Each micro-batch's summed loss is divided by the units of the whole batch, so the
        # accumulated gradient is the whole batch's; DeepSpeed averages over ranks, hence x world.
        scale = self.world / glob_units if glob_units > 0 else 0.0
        plans = self._in_step(self._gradient_plan(local, mask))
        loss_sum, grad_run, stats = self._gradient_pass(
            local, plans, mask, old_logp, scale, None if scored else ent
        )
        # The policy-gradient norm before clipping. ZeRO's optimizers record it in step();
        # stage 0 clips in place inside step() and records nothing, so measure it first.
        pre_clip = self._local_grad_norm() if self.cfg.zero_stage == 0 else None
        self.engine.step()
        self.steps_done += 1

        names = sorted(stats)
        reduced = D.all_reduce_sum(
            [
                float(mask.sum()),
                float(resp.sum()),
                float((ent * resp).sum()),
                loss_sum,
                float(grad_run[1]),
                float(score_run[0] + grad_run[0]),
                float(score_run[1] + grad_run[1]),
            ]
            + [stats[k][0] for k in names]
            + [stats[k][1] for k in names],
            self.device,
        )
        kept_tok, valid_tok, ent_sum, glob_loss, fwd_sum, positions, real = reduced[:7]
        stat_sums, stat_counts = reduced[7 : 7 + len(names)], reduced[7 + len(names) :]
        grad_norm = pre_clip if pre_clip is not None else self.engine.get_global_grad_norm()
        metrics = {
            "loss": glob_loss / glob_units if glob_units > 0 else 0.0,
            # before clipping (learner.grad_clip), the quantity the paper bounds with Var(A)
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "entropy": ent_sum / max(valid_tok, 1.0),
            "samples_in": float(batch.size),
            "tokens_valid": valid_tok,
            "tokens_kept": kept_tok,
            "tokens_forward": fwd_sum,
            "micro_batches": float(len(plans)),
            # padding's share of the input positions both passes ran forward
            "padded_token_share": (positions - real) / positions if positions > 0 else 0.0,
            "learner_seconds": time.perf_counter() - t0,
        }
        metrics.update(
            {k: s / max(c, 1.0) for k, s, c in zip(names, stat_sums, stat_counts, strict=True)}
        )
        return metrics

    def _token_mask(
        self,
        local: LearnerBatch,
        resp: torch.Tensor,
        ent: torch.Tensor,
        n_rows: list[int],
        preset: Preset,
        token_ratio: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """This rank's kept response tokens [n, L-1]: the token level ranks over the whole
        batch, so entropies, response masks and advantages are gathered from every rank."""
        all_ent = D.all_gather_rows(ent, n_rows)
        all_resp = D.all_gather_rows(resp, n_rows)
        all_adv = D.all_gather_rows(local.advantages.float(), n_rows)
        mask_all = select_tokens(
            preset, all_adv.cpu(), all_ent.cpu(), all_resp.cpu(), token_ratio, generator
        )
        lo = sum(n_rows[: self.rank])
        return mask_all[lo : lo + n_rows[self.rank]].to(self.device) & resp

    def _gradient_pass(
        self,
        local: LearnerBatch,
        plans: list[MicroBatch],
        mask: torch.Tensor,
        old_logp: torch.Tensor,
        scale: float,
        ent: torch.Tensor | None = None,
    ) -> tuple[float, list[int], dict[str, list[float]]]:
        """Backward over ``plans``, all adding to one gradient (the last marks the accumulation
        boundary). Returns the summed loss, [input positions run, real tokens among them], and
        each loss statistic's [sum, count]. With ``ent`` no no-grad pass ran: the old log-probs
        are this pass's own, detached, and the kept tokens' entropies are written to ``ent``."""
        behav = local.behav_logp[:, 1:]
        adv = local.advantages
        loss_sum, run = 0.0, [0, 0]
        stats: dict[str, list[float]] = {}
        for i, mb in enumerate(plans):
            self.engine.set_gradient_accumulation_boundary(i == len(plans) - 1)
            rows = mb.rows.to(self.device)
            sub = local.rows(rows)
            cols = mb.width - 1
            g_mask = mask[rows, :cols] & mb.live
            old = old_logp[rows, :cols]
            # Unkept targets get old_logp as their logp: ratio exactly 1 there, never exp() of
            # a large gap, and the mask zeroes them anyway.
            logp, e = self._forward(sub, mb, g_mask, old, with_entropy=ent is not None)
            if ent is not None:
                old = logp.detach()
                if mb.live:
                    ent[rows, :cols] = e
            part = self.loss_fn.summed(logp, old, adv[rows], g_mask, behav[rows, :cols])
            self.engine.backward(part.total * scale)
            loss_sum += float(part.total.detach())
            run = [a + b for a, b in zip(run, self._positions(sub, mb), strict=True)]
            for k, (v, c) in part.stats.items():
                acc = stats.setdefault(k, [0.0, 0.0])
                acc[0] += v
                acc[1] += c
        return loss_sum, run, stats

    def _local_grad_norm(self) -> float | None:
        """L2 norm of the module's gradients as they are now (whole, already averaged over ranks
        without ZeRO); None when no parameter has one."""
        norms = [
            p.grad.detach().float().norm()
            for p in self.engine.module.parameters()
            if p.grad is not None
        ]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None

    # -- weights and checkpoints -------------------------------------------------------------

    def set_sync_dtype(self, dtype: torch.dtype) -> None:
        """Publish a LoRA adapter in ``dtype``, the one the rollout engines compute in."""
        self.sync_dtype = dtype

    def state_dict_cpu(self) -> dict[str, torch.Tensor]:
        """What a version carries, on CPU (gathered across ranks under ZeRO-3): the full weights
        in float32, or with LoRA the adapter alone in :attr:`sync_dtype`."""
        return host_weights(self.engine.module, self.cfg.zero_stage == 3, self.sync_dtype)

    def device_weights(
        self, announce: Callable[[list[str]], None] | None = None
    ) -> dict[str, torch.Tensor] | ZeroShardedWeights:
        """The weights where training holds them (its device and dtype), for a transport that
        broadcasts from the device: the live tensors themselves under ZeRO 0-2 (no copy; valid
        until the next step); under ZeRO-3 a source the publisher gathers one bucket at a time
        (``announce``: rank 0 of several tells the followers each gather). With LoRA: the
        adapter alone, in :attr:`sync_dtype`."""
        module = self.engine.module
        if self.cfg.zero_stage == 3:
            return ZeroShardedWeights(module, announce, self.sync_dtype)
        return live_weights(module, self.sync_dtype)

    def save_checkpoint(self, directory: Path, step: int, client_state: dict[str, Any]) -> None:
        state = dict(client_state, step=step, torch_rng=torch.get_rng_state())
        lora = self.cfg.lora is not None  # the frozen base is the start model's: adapter only
        self.engine.save_checkpoint(
            str(directory), f"step{step:07d}", state, exclude_frozen_parameters=lora
        )
        if lora and self.rank == 0:  # what export and eval rebuild the adapter from
            save_adapter_config(self.module, Path(directory) / f"step{step:07d}")
        log.info("checkpoint saved: %s (step %d)", directory, step)

    def load_checkpoint(self, directory: Path) -> dict[str, Any] | None:
        """Resume from the latest tag in ``directory``; None when there is nothing to resume."""
        if not (Path(directory) / "latest").exists():
            return None
        path, state = self.engine.load_checkpoint(
            str(directory), load_module_strict=self.cfg.lora is None
        )
        if path is None:
            return None
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        self.steps_done = int(state.get("step", 0))
        log.info("resumed from %s at step %d", path, self.steps_done)
        return state
