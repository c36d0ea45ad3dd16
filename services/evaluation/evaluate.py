"""Held-out evaluation as the field reports it: greedy accuracy, pass@k, maj@k, response length.

Greedy accuracy comes from :func:`services.policy.evaluate.evaluate_greedy` (the number every run
already logs); sampled metrics from ``n_samples`` responses per prompt drawn by the rollout
engine (:class:`HFRolloutEngine`), so evaluation samples exactly as training does. Prompts that
carry a ``difficulty`` attribute (see ``services.tasks.mixed``) are also reported per difficulty,
and prompts from two sources or more (``Prompt.source``: reasoning-gym datasets, data files, a
plug-in's tags) per source.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from services.evaluation.answers import EXTRACTORS, AnswerExtractor
from services.evaluation.estimators import maj_at_k, pass_at_k_per_prompt
from services.evaluation.results import EvalResult, GroupEval, PromptEval
from services.policy.evaluate import greedy_correct
from services.rollout.engine import NO_STOP
from services.rollout.hf_engine import HFRolloutEngine
from services.tasks.base import Prompt
from services.tasks.verify import CORRECT_REWARD, VERIFIERS, Verifier, score_response


def prompt_difficulty(prompt: Prompt) -> int | None:
    """The prompt's ``difficulty`` attribute if it has one (an int), else None."""
    d = getattr(prompt, "difficulty", None)
    return None if d is None else int(d)


def chunk_seed(seed: int, chunk: int) -> int:
    """Sampling seed of the ``chunk``-th batch of prompts: independent streams per chunk that
    depend only on (seed, chunk), so a result is reproducible for a given ``batch_size``."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def _resolve_verifier(
    verifier: Verifier | Mapping[str, Verifier] | None,
) -> Callable[[Prompt], Verifier]:
    if verifier is None:
        verifier = VERIFIERS
    if isinstance(verifier, Mapping):
        table = verifier

        def lookup(p: Prompt) -> Verifier:
            try:
                return table[p.task]
            except KeyError:
                raise KeyError(
                    f"verifier: no entry for task {p.task!r}; have {sorted(table)}"
                ) from None

        return lookup
    if not callable(verifier):
        raise ValueError(
            f"verifier must be a callable, a mapping or None, got {type(verifier).__name__}"
        )
    return lambda p: verifier


def _check_settings(
    prompts: Sequence[Prompt],
    n_samples: int,
    ks: Sequence[int],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    greedy: bool,
    batch_size: int,
) -> list[int]:
    if not prompts:
        raise ValueError("prompts is empty: nothing to evaluate")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    ks = sorted({int(k) for k in ks})
    if n_samples == 0 and ks:
        raise ValueError(f"ks must be empty when n_samples is 0 (greedy only), got {ks}")
    if ks and not 1 <= ks[0] <= ks[-1] <= n_samples:
        raise ValueError(f"ks must lie in 1..n_samples={n_samples} (pass@k needs n >= k), got {ks}")
    if n_samples > 0 and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not greedy and n_samples == 0:
        raise ValueError("greedy is False and n_samples is 0: nothing to measure")
    return ks


def _sample(
    engine: HFRolloutEngine,
    prompts: Sequence[Prompt],
    verifier_of: Callable[[Prompt], Verifier],
    extractors: Mapping[str, AnswerExtractor],
    n_samples: int,
    seed: int,
    batch_size: int,
) -> list[PromptEval]:
    """``n_samples`` responses per prompt from ``engine``, scored and parsed, in prompt order."""
    out: list[PromptEval] = []
    for chunk_index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start : start + batch_size])
        batch = engine.generate(chunk, n_samples, seed=chunk_seed(seed, chunk_index))
        lengths = batch.response_lengths  # [N]
        # Cut by the length limit: no stop token (EOS or the chat template's end-of-turn) ended it.
        truncated = (batch.stop_token == NO_STOP).tolist()
        for i, p in enumerate(chunk):
            verify = verifier_of(p)
            extract = extractors.get(p.task, _strip_answer)
            rows = range(i * n_samples, (i + 1) * n_samples)
            texts = [batch.texts[r] for r in rows]
            out.append(
                PromptEval(
                    prompt_id=p.prompt_id,
                    difficulty=prompt_difficulty(p),
                    source=p.source,
                    answers=[extract(t) for t in texts],
                    formatted=p.task in extractors,
                    correct=[float(score_response(verify, p, t)) >= CORRECT_REWARD for t in texts],
                    lengths=[int(lengths[r]) for r in rows],
                    truncated=[bool(truncated[r]) for r in rows],
                )
            )
    return out


def _strip_answer(response_text: str) -> str | None:
    """Fallback extractor for tasks without one: the stripped response, None if empty."""
    return response_text.strip() or None


def _sampled_metrics(records: Sequence[PromptEval], ks: Sequence[int], n_samples: int) -> dict:
    counts = np.array([r.n_correct for r in records], dtype=np.int64)  # [B]
    lengths = np.array([r.lengths for r in records], dtype=np.float64)  # [B, n]
    return {
        "pass_at_k": {k: float(pass_at_k_per_prompt(n_samples, counts, k).mean()) for k in ks},
        "maj_at_k": {
            k: float(np.mean([maj_at_k(r.answers, r.correct, k) for r in records])) for k in ks
        },
        "sample_accuracy": float(counts.sum() / (len(records) * n_samples)),
        "mean_response_length": float(lengths.mean()),
        "truncated_fraction": float(np.mean([r.truncated for r in records])),
        "format_rate": (
            float(np.mean([[a is not None for a in r.answers] for r in records]))
            if records and all(r.formatted for r in records)
            else None
        ),
    }


def _groups(
    prompts: list[Prompt],
) -> tuple[GroupEval, dict[int, GroupEval], dict[str, GroupEval]]:
    """Empty metrics for all prompts, for each difficulty level, and for each source (when
    there are two sources or more)."""
    difficulties = [prompt_difficulty(p) for p in prompts]
    levels = sorted({d for d in difficulties if d is not None})
    sources = [p.source for p in prompts]
    names = sorted({s for s in sources if s})
    by_source = {s: GroupEval(sources.count(s)) for s in names} if len(names) > 1 else {}
    by_level = {d: GroupEval(difficulties.count(d)) for d in levels}
    return GroupEval(len(prompts)), by_level, by_source


def _greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int,
    rows: int,
    verifiers: Mapping[str, Verifier] | None,
    groups: tuple[GroupEval, dict[int, GroupEval], dict[str, GroupEval]],
) -> None:
    """Greedy accuracy over all prompts, per difficulty and per source, into ``groups``, from
    one greedy pass."""
    if verifiers is not None:
        lookup = _resolve_verifier(verifiers)
        for p in prompts:
            lookup(p)  # a missing key fails here, named, not deep in generation
    correct = greedy_correct(model, tokenizer, prompts, max_new_tokens, rows, verifiers)
    overall, by_difficulty, by_source = groups
    overall.greedy_accuracy = sum(correct) / len(prompts)
    for d, group in by_difficulty.items():
        hits = [c for c, p in zip(correct, prompts, strict=True) if prompt_difficulty(p) == d]
        group.greedy_accuracy = sum(hits) / len(hits)
    for name, group in by_source.items():
        hits = [c for c, p in zip(correct, prompts, strict=True) if p.source == name]
        group.greedy_accuracy = sum(hits) / len(hits)


def _set_sampled(
    group: GroupEval, records: Sequence[PromptEval], ks: Sequence[int], n_samples: int
) -> None:
    for name, value in _sampled_metrics(records, ks, n_samples).items():
        setattr(group, name, value)


def _set_sampled_groups(
    by_difficulty: dict[int, GroupEval],
    by_source: dict[str, GroupEval],
    records: Sequence[PromptEval],
    ks: Sequence[int],
    n_samples: int,
) -> None:
    for d, group in by_difficulty.items():
        _set_sampled(group, [r for r in records if r.difficulty == d], ks, n_samples)
    for name, group in by_source.items():
        _set_sampled(group, [r for r in records if r.source == name], ks, n_samples)


def evaluate_policy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    verifier: Verifier | Mapping[str, Verifier] | None = None,
    *,
    n_samples: int = 16,
    ks: Sequence[int] = (1, 8),
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int,
    seed: int = 0,
    greedy: bool = True,
    batch_size: int = 64,
    extractors: Mapping[str, AnswerExtractor] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``prompts``: greedy accuracy, pass@k, maj@k, response length.

    Args:
        model: Causal LM (restored to its train/eval mode afterwards).
        tokenizer: A Hugging Face tokenizer (the built-in char tokenizer is one too).
        prompts: Held-out prompts; those with a ``difficulty`` attribute are also grouped.
        verifier: Scores sampled responses: one verifier for every prompt, a mapping keyed by
            ``Prompt.task`` (e.g. ``TaskSource.verifiers``, time-limited), or None for
            ``VERIFIERS``. A sample is correct when its reward is >= 1. Greedy accuracy uses the
            mapping too when one is given, else the verifier ``prompt.task`` names.
        n_samples: Responses sampled per prompt; 0 measures greedy accuracy only.
        ks: The k of pass@k and maj@k, each in ``1..n_samples``.
        temperature: Sampling temperature (> 0).
        top_p: Nucleus threshold in (0, 1].
        max_new_tokens: Response length limit, EOS included.
        seed: Sampling seed; the result is deterministic for given (weights, prompts,
            batch_size, seed) on one device and thread count.
        greedy: Also measure greedy accuracy.
        batch_size: Prompts per sampling call (``batch_size * n_samples`` rows); greedy
            decoding uses ``batch_size * max(n_samples, 1)`` rows per call.
        extractors: Answer extractors for maj@k keyed by ``Prompt.task`` (default
            ``answers.EXTRACTORS``); a task without one votes on the stripped response.

    Raises:
        ValueError: naming the argument on bad settings.
    """
    t0 = time.perf_counter()
    ks = _check_settings(
        prompts, n_samples, ks, temperature, top_p, max_new_tokens, seed, greedy, batch_size
    )
    prompts = list(prompts)
    verifier_of = _resolve_verifier(verifier)
    extractors = EXTRACTORS if extractors is None else extractors
    groups = _groups(prompts)
    overall, by_difficulty, by_source = groups
    records: list[PromptEval] = []
    was_training = model.training
    try:
        if greedy:
            rows = batch_size * max(n_samples, 1)
            table = verifier if isinstance(verifier, Mapping) else None
            _greedy(model, tokenizer, prompts, max_new_tokens, rows, table, groups)
        if n_samples > 0:
            engine = HFRolloutEngine(model, tokenizer, max_new_tokens, temperature, top_p)
            records = _sample(engine, prompts, verifier_of, extractors, n_samples, seed, batch_size)
            _set_sampled(overall, records, ks, n_samples)
            _set_sampled_groups(by_difficulty, by_source, records, ks, n_samples)
    finally:
        model.train(was_training)
    return EvalResult(
        overall=overall,
        by_difficulty=by_difficulty,
        n_samples=n_samples,
        ks=ks,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        seconds=time.perf_counter() - t0,
        by_source=by_source,
        prompts=records,
    )
