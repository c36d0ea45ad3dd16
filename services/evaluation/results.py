"""What a held-out evaluation measured: per prompt, per group of prompts, and the whole result.

:class:`EvalResult` is what :func:`services.evaluation.evaluate.evaluate_policy` returns, what
``d3s eval`` writes as JSON (:meth:`EvalResult.to_dict`, read back by
:meth:`EvalResult.from_dict`) and prints as a table, and what a run logs as ``eval/*`` metrics
(:meth:`EvalResult.metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from services.common.metric_names import source_suffix

__all__ = ["EvalResult", "GroupEval", "PromptEval", "source_suffix"]


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
        source: The prompt's source (``Prompt.source``; empty for the built-in tasks).
    """

    prompt_id: str
    difficulty: int | None
    answers: list[str | None]
    correct: list[bool]
    lengths: list[int]
    truncated: list[bool]
    formatted: bool = False
    source: str = ""

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
        by_source: source -> metrics over that source's prompts (a reasoning-gym dataset, a data
            file, a plug-in's tag); empty unless the prompts come from two sources or more.
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
    by_source: dict[str, GroupEval] = field(default_factory=dict)
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
            "by_source": {k: g.to_dict() for k, g in sorted(self.by_source.items())},
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
            by_source={k: GroupEval.from_dict(g) for k, g in d.get("by_source", {}).items()},
            prompts=[PromptEval(**p) for p in d.get("prompts", [])],
        )

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat ``name -> value`` for the metric log: ``{prefix}greedy_accuracy``,
        ``{prefix}pass@k``, ``{prefix}maj@k``, ``{prefix}mean_response_length``,
        ``{prefix}truncated_fraction``, ``{prefix}format_rate``, and per difficulty the same with a
        ``/d{difficulty}`` suffix, per source with ``/src:{source}`` (:func:`source_suffix`).
        Metrics that were not measured are left out."""
        out: dict[str, float] = {}
        groups: list[tuple[str, GroupEval]] = [("", self.overall)]
        groups += [(f"/d{k}", g) for k, g in sorted(self.by_difficulty.items())]
        groups += [(source_suffix(k), g) for k, g in sorted(self.by_source.items())]
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
        difficulty and one per source; columns prompts, greedy, pass@k..., maj@k..., mean length."""
        header = ["source" if self.by_source else "difficulty", "prompts", "greedy"]
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
        rows += [row(k, g) for k, g in sorted(self.by_source.items())]
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
