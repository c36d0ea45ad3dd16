"""Held-out evaluation as the field reports it: greedy accuracy, pass@k, maj@k, response length.

Greedy accuracy comes from :func:`services.policy.evaluate.evaluate_greedy` (the number every run
already logs); sampled metrics from ``n_samples`` responses per prompt drawn by the rollout
engine (:class:`HFRolloutEngine`), so evaluation samples exactly as training does. Prompts that
carry a ``difficulty`` attribute (see ``services.tasks.mixed``) are also reported per difficulty.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from services.evaluation.answers import EXTRACTORS, AnswerExtractor
from services.evaluation.estimators import maj_at_k, pass_at_k_per_prompt
from services.policy.evaluate import evaluate_greedy
from services.rollout.engine import NO_STOP
from services.rollout.hf_engine import HFRolloutEngine
from services.tasks.base import Prompt
from services.tasks.verify import CORRECT_REWARD, VERIFIERS, Verifier


def prompt_difficulty(prompt: Prompt) -> int | None:
    """The prompt's ``difficulty`` attribute if it has one (an int), else None."""
    d = getattr(prompt, "difficulty", None)
    return None if d is None else int(d)


def chunk_seed(seed: int, chunk: int) -> int:
    """Sampling seed of the ``chunk``-th batch of prompts: independent streams per chunk that
    depend only on (seed, chunk), so a result is reproducible for a given ``batch_size``."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


@dataclass
class PromptEval:
    """Sampled outcome of one prompt.

    Attributes:
        prompt_id: The prompt's id.
        difficulty: Its difficulty, or None.
        answers: Extracted answer per sample (None: unparsable), in sampling order.
        correct: Whether each sample earned full reward (verifier reward >= 1).
        lengths: Response tokens per sample, EOS included (as the learner counts them).
        truncated: Per sample, whether it hit ``max_new_tokens`` without a stop token.
        formatted: Whether ``answers`` came from the task's own extractor (so None there means
            the asked format was not followed).
    """

    prompt_id: str
    difficulty: int | None
    answers: list[str | None]
    correct: list[bool]
    lengths: list[int]
    truncated: list[bool]
    formatted: bool = False

    @property
    def n_correct(self) -> int:
        return sum(self.correct)


@dataclass
class GroupEval:
    """Metrics over one set of prompts (all of them, or one difficulty).

    Attributes:
        n_prompts: Prompts in the group.
        greedy_accuracy: Mean verifier reward of greedy responses; None if greedy was skipped.
        pass_at_k: k -> unbiased pass@k averaged over prompts (empty if no sampling).
        maj_at_k: k -> fraction of prompts whose majority answer over the first k samples is
            correct.
        sample_accuracy: Fraction of all samples that are correct; equals pass@1.
        mean_response_length: Mean response tokens per sample (EOS included).
        truncated_fraction: Fraction of samples cut at ``max_new_tokens`` without a stop token.
        format_rate: Fraction of samples whose answer the task's extractor could read (the
            asked format was followed, right or wrong); None for tasks without an extractor.
    """

    n_prompts: int
    greedy_accuracy: float | None = None
    pass_at_k: dict[int, float] = field(default_factory=dict)
    maj_at_k: dict[int, float] = field(default_factory=dict)
    sample_accuracy: float | None = None
    mean_response_length: float | None = None
    truncated_fraction: float | None = None
    format_rate: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        # JSON object keys are strings; keep k readable as "1", "8".
        d["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        d["maj_at_k"] = {str(k): v for k, v in self.maj_at_k.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> GroupEval:
        d = dict(d)
        d["pass_at_k"] = {int(k): float(v) for k, v in d.get("pass_at_k", {}).items()}
        d["maj_at_k"] = {int(k): float(v) for k, v in d.get("maj_at_k", {}).items()}
        return cls(**d)


@dataclass
class EvalResult:
    """Everything :func:`evaluate_policy` measured, with the settings that produced it.

    Attributes:
        overall: Metrics over all prompts.
        by_difficulty: difficulty -> metrics over the prompts of that difficulty (empty when
            no prompt carries one; prompts without a difficulty only enter ``overall``).
        n_samples: Samples per prompt (0: greedy only).
        ks: The k of pass@k and maj@k.
        temperature: Sampling temperature.
        top_p: Sampling nucleus threshold.
        max_new_tokens: Response length limit (EOS included).
        seed: Sampling seed.
        seconds: Wall time of the whole evaluation.
        prompts: Per-prompt sampled outcomes (in prompt order; empty without sampling). Left
            out of :meth:`to_dict` unless asked, as it grows with n_prompts x n_samples.
    """

    overall: GroupEval
    by_difficulty: dict[int, GroupEval]
    n_samples: int
    ks: list[int]
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    seconds: float
    prompts: list[PromptEval] = field(default_factory=list, repr=False)

    # Shortcuts for the numbers callers log most.
    @property
    def greedy_accuracy(self) -> float | None:
        return self.overall.greedy_accuracy

    @property
    def pass_at_k(self) -> dict[int, float]:
        return self.overall.pass_at_k

    @property
    def maj_at_k(self) -> dict[int, float]:
        return self.overall.maj_at_k

    @property
    def mean_response_length(self) -> float | None:
        return self.overall.mean_response_length

    def to_dict(self, per_prompt: bool = False) -> dict:
        """JSON-ready dict (difficulty and k keys as strings); ``per_prompt`` adds ``prompts``."""
        d = {
            "n_prompts": self.overall.n_prompts,
            "n_samples": self.n_samples,
            "ks": list(self.ks),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "seconds": self.seconds,
            "overall": self.overall.to_dict(),
            "by_difficulty": {str(k): g.to_dict() for k, g in sorted(self.by_difficulty.items())},
        }
        if per_prompt:
            d["prompts"] = [asdict(p) for p in self.prompts]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> EvalResult:
        """Inverse of :meth:`to_dict` (``prompts`` restored when present)."""
        return cls(
            overall=GroupEval.from_dict(d["overall"]),
            by_difficulty={int(k): GroupEval.from_dict(g) for k, g in d["by_difficulty"].items()},
            n_samples=int(d["n_samples"]),
            ks=[int(k) for k in d["ks"]],
            temperature=float(d["temperature"]),
            top_p=float(d["top_p"]),
            max_new_tokens=int(d["max_new_tokens"]),
            seed=int(d["seed"]),
            seconds=float(d["seconds"]),
            prompts=[PromptEval(**p) for p in d.get("prompts", [])],
        )

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat ``name -> value`` for the metric log: ``{prefix}greedy_accuracy``,
        ``{prefix}pass@k``, ``{prefix}maj@k``, ``{prefix}mean_response_length``,
        ``{prefix}truncated_fraction``, ``{prefix}format_rate``, and per difficulty the same with a ``/d{difficulty}``
        suffix. Metrics that were not measured are left out."""
        out: dict[str, float] = {}
        groups: list[tuple[str, GroupEval]] = [("", self.overall)]
        groups += [(f"/d{k}", g) for k, g in sorted(self.by_difficulty.items())]
        for suffix, g in groups:
            values: dict[str, float | None] = {
                "greedy_accuracy": g.greedy_accuracy,
                **{f"pass@{k}": v for k, v in g.pass_at_k.items()},
                **{f"maj@{k}": v for k, v in g.maj_at_k.items()},
                "mean_response_length": g.mean_response_length,
                "truncated_fraction": g.truncated_fraction,
                "format_rate": g.format_rate,
            }
            out.update(
                {f"{prefix}{name}{suffix}": v for name, v in values.items() if v is not None}
            )
        return out

    def table(self) -> tuple[list[str], list[list[str]]]:
        """``(header, rows)`` for a terminal table: one row for all prompts, then one per
        difficulty; columns prompts, greedy, pass@k..., maj@k..., mean length."""
        header = ["difficulty", "prompts", "greedy"]
        header += [f"pass@{k}" for k in self.ks] + [f"maj@{k}" for k in self.ks] + ["mean len"]

        def fmt(v: float | None, digits: int = 3) -> str:
            return "-" if v is None else f"{v:.{digits}f}"

        def row(name: str, g: GroupEval) -> list[str]:
            return [
                name,
                str(g.n_prompts),
                fmt(g.greedy_accuracy),
                *(fmt(g.pass_at_k.get(k)) for k in self.ks),
                *(fmt(g.maj_at_k.get(k)) for k in self.ks),
                fmt(g.mean_response_length, 2),
            ]

        rows = [row("all", self.overall)]
        rows += [row(str(k), g) for k, g in sorted(self.by_difficulty.items())]
        return header, rows

    def format_table(self) -> str:
        """:meth:`table` as aligned plain text."""
        header, rows = self.table()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


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
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    verifier_of: Callable[[Prompt], Verifier],
    extractors: Mapping[str, AnswerExtractor],
    n_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
) -> list[PromptEval]:
    """``n_samples`` responses per prompt, scored and parsed, in prompt order."""
    engine = HFRolloutEngine(
        model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
    )
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
                    answers=[extract(t) for t in texts],
                    formatted=p.task in extractors,
                    correct=[float(verify(t, p.answer)) >= CORRECT_REWARD for t in texts],
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
            ``VERIFIERS``. A sample is correct when its reward is >= 1. Greedy accuracy always
            uses ``VERIFIERS[prompt.task]`` (it is :func:`evaluate_greedy`'s number).
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
    difficulties = [prompt_difficulty(p) for p in prompts]
    levels = sorted({d for d in difficulties if d is not None})
    overall = GroupEval(n_prompts=len(prompts))
    by_difficulty = {d: GroupEval(n_prompts=difficulties.count(d)) for d in levels}

    was_training = model.training
    try:
        if greedy:
            greedy_rows = batch_size * max(n_samples, 1)
            overall.greedy_accuracy = evaluate_greedy(
                model, tokenizer, prompts, max_new_tokens, greedy_rows
            )
            if len(levels) == 1 and None not in difficulties:
                by_difficulty[levels[0]].greedy_accuracy = overall.greedy_accuracy
            else:
                for d in levels:
                    group = [p for p, pd in zip(prompts, difficulties, strict=True) if pd == d]
                    by_difficulty[d].greedy_accuracy = evaluate_greedy(
                        model, tokenizer, group, max_new_tokens, greedy_rows
                    )
        records: list[PromptEval] = []
        if n_samples > 0:
            records = _sample(
                model,
                tokenizer,
                prompts,
                verifier_of,
                extractors,
                n_samples,
                temperature,
                top_p,
                max_new_tokens,
                seed,
                batch_size,
            )
            for name, value in _sampled_metrics(records, ks, n_samples).items():
                setattr(overall, name, value)
            for d in levels:
                group_records = [r for r in records if r.difficulty == d]
                for name, value in _sampled_metrics(group_records, ks, n_samples).items():
                    setattr(by_difficulty[d], name, value)
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
        prompts=records,
    )
