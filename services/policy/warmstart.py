"""Supervised warm start of the tiny policy on (imperfect) demonstrations of a built-in task
(addition or mixed arithmetic), with the char tokenizer of that task's alphabet.

RL needs headroom. A random model gets zero reward; a model warm-started on clean
data is already near what RL can reach at this size. Training on demonstrations where
``wrong_fraction`` of the answers are off by one (+1) leaves a policy that often *knows* the
sum but prefers the wrong answer, which RL can fix. Checkpoints are cached by a hash of the
spec, so runs and seeds share one warm start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from services.policy import shipped
from services.policy.config import WARMSTART_FORMAT, PolicySpec, WarmstartConfig
from services.policy.evaluate import evaluate_greedy
from services.policy.model import build_policy, save_policy
from services.policy.probe import StartProbe, probe_start
from services.policy.tokenizer import CharTokenizer
from services.tasks.base import Prompt
from services.tasks.config import ArithmeticTaskConfig, SyntheticTaskConfig
from services.tasks.source import synthetic_task

logger = logging.getLogger(__name__)

METADATA_FILE = "warmstart.json"

TaskSpec = SyntheticTaskConfig | int
"""A built-in task config, or an int: the addition task's operand digits."""

ProgressFn = Callable[[int, int, float], None]
"""``progress(step, total_steps, loss)``, called after every optimiser step of an attempt;
``total_steps`` is the upper bound (``max_steps`` with a band, else ``steps``)."""


def _lr_factor(step: int, spec: WarmstartConfig) -> float:
    return min(1.0, (step + 1) / max(1, spec.warmup_steps))


def task_identity(task: TaskSpec) -> int | dict:
    """What of ``task`` the warm start's cache key depends on: the digits for addition (so its
    key is what it always was), else the task's fields minus evaluation-only ones."""
    if isinstance(task, int):
        return task
    if isinstance(task, ArithmeticTaskConfig):
        return task.digits
    return task.model_dump(mode="json", exclude={"heldout_size", "verifier_timeout_s"})


def demonstration_batch(
    tokenizer: CharTokenizer, prompts: list[Prompt], targets: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forcing tensors for prompt + target + EOS, right-padded.

    Returns:
        input_ids: int64 [B, L-1] (the sequence without its last token).
        labels: int64 [B, L-1], next token at answer and EOS positions, -100 elsewhere (the
            prompt is given, not learned).
        attention_mask: int64 [B, L-1].
    """
    seqs, n_prompt = [], []
    for p, t in zip(prompts, targets, strict=True):
        pi = tokenizer.encode(p.text)
        seqs.append(pi + tokenizer.encode(t) + [tokenizer.eos_token_id])
        n_prompt.append(len(pi))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, k) in enumerate(zip(seqs, n_prompt, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, k : len(s)] = ids[i, k : len(s)]
        mask[i, : len(s)] = 1
    return ids[:, :-1], labels[:, 1:], mask[:, :-1]


class NoStartInBand(RuntimeError):
    """No attempt of a warm start landed in its band."""


def attempt_seed(seed: int, attempt: int) -> int:
    """The initialisation and data seed of attempt ``attempt`` (0: ``seed`` itself, so a start
    in the band at its first attempt is what the fixed recipe with that seed trains)."""
    if attempt == 0:
        return seed
    return int(np.random.SeedSequence([seed, attempt, 0x57A7]).generate_state(1)[0] % (1 << 31))


def _sft_step(model, optim, sched, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """One supervised step on a demonstration batch; returns its loss."""
    # No attention mask: padding is on the right and attention is causal, so no real token
    # ever sees a pad, and pads carry no loss. (The mask path costs ~15% here.)
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    sched.step()
    return loss.detach().item()


def _probe(model, tokenizer, dev, max_new: int, samples: int, seed: int, step: int) -> StartProbe:
    """The band's probe of the model being trained, logged; training's RNG streams untouched."""
    # Sampling must not move the training's RNG streams (numpy's is separate).
    with torch.random.fork_rng(devices=[]):
        probe = probe_start(model, tokenizer, dev, max_new, samples, seed=seed)
    model.train()
    logger.info(
        "warmstart step %d: dev greedy %.3f, sampled %.3f, pass@%d %.3f, entropy %.3f",
        step,
        probe.greedy_accuracy,
        probe.sample_accuracy,
        probe.samples,
        probe.pass_at_k,
        probe.entropy,
    )
    return probe


def _train_attempt(
    spec: WarmstartConfig,
    policy: PolicySpec,
    task_spec: TaskSpec,
    seed: int,
    progress: ProgressFn | None,
) -> tuple[torch.nn.Module, CharTokenizer, dict]:
    """One attempt: train from the initialisation ``seed`` until the band holds at a probe
    (every ``check_every`` steps from ``steps`` on) or ``max_steps``; without a band, exactly
    ``steps``. Returns (model in eval mode, tokenizer, stats with ``in_band`` and the probes)."""
    task, alphabet = synthetic_task(task_spec, seed=seed)
    tokenizer = CharTokenizer(alphabet)
    model = build_policy(policy, tokenizer, seed=seed)
    rng = np.random.default_rng([seed, 0x5F7])
    dev = task.train_prompts(spec.dev_prompts, np.random.default_rng([seed, 0xDE5]))
    max_new = task.max_answer_len + 1
    band = spec.band
    last_step = spec.max_steps if band is not None else spec.steps
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr_factor(s, spec))
    wrong = spec.effective_wrong_fraction
    model.train()
    t0 = time.perf_counter()
    ema, step, probes, in_band = None, 0, [], band is None
    while step < last_step:
        prompts = task.train_prompts(spec.batch_size, rng)
        targets = [task.demonstration(p, wrong, rng) for p in prompts]
        ids, labels, _ = demonstration_batch(tokenizer, prompts, targets)
        value = _sft_step(model, optim, sched, ids, labels)
        step += 1
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if progress is not None:
            progress(step, last_step, value)
        if step % 250 == 0:
            logger.info(
                "warmstart step %d loss %.4f (ema %.4f) %.1fs",
                step,
                value,
                ema,
                time.perf_counter() - t0,
            )
        if band is not None and step >= spec.steps and (step - spec.steps) % spec.check_every == 0:
            probe = _probe(model, tokenizer, dev, max_new, band.samples, seed, step)
            probes.append({"step": step, **asdict(probe)})
            if band.holds(probe):
                in_band = True
                break
    model.eval()
    stats = {
        "seed_used": seed,
        "steps_run": step,
        "train_seconds": time.perf_counter() - t0,
        "final_loss_ema": ema,
        "in_band": in_band,
        "probe": probes[-1] if probes else None,
        "probes": probes,
    }
    return model, tokenizer, stats


def train_demonstrations(
    spec: WarmstartConfig,
    policy: PolicySpec,
    task_spec: TaskSpec,
    progress: ProgressFn | None = None,
) -> tuple[torch.nn.Module, CharTokenizer, dict]:
    """Run the supervised training in memory, attempt after attempt until one lands in the
    band. Returns (model in eval mode, tokenizer, stats of the kept attempt).

    Raises:
        NoStartInBand: after ``spec.attempts`` attempts outside the band.
    """
    tried = []
    for attempt in range(spec.attempts):
        seed = attempt_seed(spec.seed, attempt)
        model, tokenizer, stats = _train_attempt(spec, policy, task_spec, seed, progress)
        if stats["in_band"]:
            return model, tokenizer, {"attempt": attempt, "attempts_outside_band": tried, **stats}
        logger.warning(
            "warm start attempt %d (seed %d) never reached the band %s in %d steps; last probe %s",
            attempt,
            seed,
            spec.band,
            stats["steps_run"],
            stats["probe"],
        )
        tried.append({"seed": seed, "probes": stats["probes"]})
    raise NoStartInBand(
        f"warmstart: none of {spec.attempts} attempts reached warmstart.band ({spec.band}) by "
        f"max_steps={spec.max_steps}; last probes: {[t['probes'][-1:] for t in tried]}. Widen the "
        "band, raise max_steps or attempts, or set warmstart.band: null to keep a fixed step count"
    )


def warmstart(
    spec: WarmstartConfig,
    policy: PolicySpec,
    task: TaskSpec,
    progress: ProgressFn | None = None,
    rebuild: bool = False,
) -> Path:
    """Path of a warm-started checkpoint of ``policy`` on ``task`` (a built-in task config, or
    the addition task's digits), trained as ``spec`` says.

    In order: the start shipped with the package for this spec (checksums verified; see
    :mod:`services.policy.shipped`) when ``spec.use_shipped``; else one cached in
    ``spec.cache_dir/<cache key>/``; else it is trained here and cached (HF format, tokenizer
    included, + ``warmstart.json`` with the spec, timings and probe). ``rebuild`` skips both
    and trains. Training writes into a temporary directory that is renamed into place, so a
    crash never leaves a half checkpoint and concurrent callers end up with one complete copy.
    """
    cache_dir = Path(spec.cache_dir)
    identity = task_identity(task)
    key = spec.cache_key(policy, identity)
    final = cache_dir / key
    if not rebuild:
        if spec.use_shipped and (found := shipped.find(key)) is not None:
            logger.info("warm start shipped with the package: %s", found)
            return found
        if (final / METADATA_FILE).is_file():
            logger.info("warm start cached at %s", final)
            return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("warm start: training %s into %s", spec, final)
    model, tokenizer, stats = train_demonstrations(spec, policy, task, progress)
    if spec.eval_prompts > 0:
        built, _ = synthetic_task(task, seed=spec.seed)
        t0 = time.perf_counter()
        heldout, max_new = built.heldout(spec.eval_prompts), built.max_answer_len + 1
        if spec.band is not None:  # the probe's greedy pass is the held-out accuracy
            probe = probe_start(model, tokenizer, heldout, max_new, spec.band.samples)
            stats["heldout_probe"] = asdict(probe)
            stats["heldout_accuracy"] = probe.greedy_accuracy
        else:
            stats["heldout_accuracy"] = evaluate_greedy(model, tokenizer, heldout, max_new)
        stats["eval_seconds"] = time.perf_counter() - t0
        logger.info("warm start held-out greedy accuracy %.3f", stats["heldout_accuracy"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache_dir))
    try:
        save_policy(model, tokenizer, tmp)
        meta = {
            "spec": spec.model_dump(mode="json", exclude={"cache_dir", "use_shipped"}),
            "model": policy.model_dump(),
            "task": identity,
            "format": WARMSTART_FORMAT,
            **stats,
        }
        if isinstance(identity, int):
            meta["digits"] = identity
        # Metadata last: its presence marks a complete checkpoint.
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1))
        try:
            if rebuild and final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError:
            if not (final / METADATA_FILE).is_file():
                raise
            # Another process finished the same spec first; keep theirs.
            logger.info("warm start %s was completed concurrently; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def describe_warmstart(path: Path) -> str:
    """One line on a warm-start checkpoint from its metadata: steps, accuracy, probe."""
    meta = json.loads((Path(path) / METADATA_FILE).read_text())
    parts = [f"{meta.get('steps_run', '?')} steps from seed {meta.get('seed_used', '?')}"]
    if meta.get("heldout_accuracy") is not None:
        parts.append(f"held-out greedy accuracy {meta['heldout_accuracy']:.3f}")
    if probe := meta.get("heldout_probe"):
        parts.append(
            f"sampled accuracy {probe['sample_accuracy']:.3f}, "
            f"pass@{probe['samples']} {probe['pass_at_k']:.3f}, entropy {probe['entropy']:.2f}"
        )
    return "; ".join(parts)
