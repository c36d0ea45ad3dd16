"""The run configuration: one YAML file, validated by typed models before anything starts.

Every section forbids unknown keys, so a typo (`prompt_per_step`) fails with its dotted path
instead of silently taking a default. Batch sizes say what they count: prompts or samples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from learner.config import LearnerConfig
from selector.presets import PRESETS, Preset, get_preset
from selector.schedule import Schedule


class ConfigError(ValueError):
    """An invalid configuration; the message names each wrong field by its dotted path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskConfig(_Section):
    kind: Literal["arithmetic", "jsonl"] = "arithmetic"
    digits: int = Field(3, ge=1, le=6, description="operand digits of the arithmetic task")
    train_path: Path | None = Field(None, description="GSM8K/MATH-style JSONL (kind: jsonl)")
    eval_path: Path | None = Field(None, description="held-out JSONL (kind: jsonl)")
    heldout_size: int = Field(500, ge=1)
    verifier_timeout_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _paths(self) -> TaskConfig:
        if self.kind == "jsonl" and self.train_path is None:
            raise ValueError("train_path is required when kind is 'jsonl'")
        return self


class PolicyConfig(_Section):
    path: Path | None = Field(None, description="a local Hugging Face model directory; skips the warm start")
    n_layer: int = Field(3, ge=1)
    n_embd: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    n_positions: int = Field(32, ge=8)


class WarmstartConfig(_Section):
    # 3000 steps on imperfect demonstrations: the policy learns the sums (carries included) but
    # prefers the off-by-one answer, so greedy accuracy starts low (~0.16) and RL has a clear job.
    # Stopping at the first 0.2 greedy accuracy instead left a model that could not add, and
    # every method plateaued near 0.52 (bench history in the README).
    steps: int = Field(3000, ge=0, description="minimum supervised steps")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    wrong_fraction: float = Field(0.55, ge=0, le=1, description="share of off-by-one demonstrations")
    clean: bool = False
    seed: int = 0
    # After `steps`, keep training until greedy accuracy on training-split prompts reaches
    # min_accuracy (the plateau break-out time varies a lot by seed); 0 disables.
    min_accuracy: float = Field(0.0, ge=0, le=1)
    max_steps: int = Field(3000, ge=0)
    eval_every: int = Field(50, ge=1)
    dev_prompts: int = Field(500, ge=1)
    cache_dir: Path = Path(".cache/warmstart")


class RolloutConfig(_Section):
    prompts_per_step: int = Field(32, ge=1)
    samples_per_prompt: int = Field(8, ge=2, description="G; one sample has no group baseline")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(5, ge=1)
    num_actors: int = Field(1, ge=1)
    engine: Literal["hf", "vllm"] = "hf"


class AlgorithmConfig(_Section):
    preset: str = "d3s"
    schedule: Literal["linear", "cosine", "constant"] | None = None
    sample_init: float | None = Field(None, gt=0, le=1)
    sample_final: float | None = Field(None, gt=0, le=1)
    token_init: float | None = Field(None, gt=0, le=1)
    token_final: float | None = Field(None, gt=0, le=1)
    token_pool: Literal["batch", "sequence"] | None = None
    renormalize: bool | None = None
    adv_eps: float = Field(1e-6, gt=0)

    @model_validator(mode="after")
    def _known(self) -> AlgorithmConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; choose from {sorted(PRESETS)}")
        self.build_preset()  # surfaces a bad combination now, not at step 1
        return self

    def build_preset(self) -> Preset:
        base = get_preset(self.preset)
        s = base.schedule
        sched = Schedule(
            kind=self.schedule or s.kind,
            sample_init=self.sample_init or s.sample_init,
            sample_final=self.sample_final or s.sample_final,
            token_init=self.token_init or s.token_init,
            token_final=self.token_final or s.token_final,
        )
        changes: dict[str, Any] = {"schedule": sched}
        if self.token_pool is not None:
            changes["token_pool"] = self.token_pool
        if self.renormalize is not None:
            changes["renormalize"] = self.renormalize
        return base.with_overrides(**changes)


class TrainConfig(_Section):
    total_steps: int = Field(200, ge=1)
    eval_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0
    run_dir: Path = Path("runs/default")
    resume: bool = True
    progress_bar: bool = True


class ServiceConfig(_Section):
    mode: Literal["async", "sync"] = "async"
    redis_url: str | None = Field(None, description="use this Redis; default: start an embedded one")
    ray_address: str | None = None
    namespace: str = Field("d3s", pattern=r"^[A-Za-z0-9_.-]+$")
    max_staleness: int = Field(1, ge=0, description="0 is strictly on-policy")
    max_group_backlog: int = Field(256, ge=1, description="rollout pauses above this many queued groups")
    max_batch_backlog: int = Field(2, ge=1, description="selector pauses above this many queued batches")
    wait_timeout_s: float = Field(300.0, gt=0, description="every wait fails with a message after this")


class ApiConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    control_token_env: str = Field("D3S_CONTROL_TOKEN", description="env var holding the bearer token")


class RunConfig(_Section):
    name: str = "d3s"
    task: TaskConfig = TaskConfig()
    policy: PolicyConfig = PolicyConfig()
    warmstart: WarmstartConfig = WarmstartConfig()
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    learner: LearnerConfig = LearnerConfig()
    train: TrainConfig = TrainConfig()
    service: ServiceConfig = ServiceConfig()
    api: ApiConfig = ApiConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if abs(self.learner.temperature - self.rollout.temperature) > 1e-12:
            raise ValueError("learner.temperature must equal rollout.temperature: the learner must "
                             "score the distribution the rollouts were sampled from")
        return self

    def control_token(self) -> str | None:
        return os.environ.get(self.api.control_token_env) or None


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"invalid override {dotted!r}: {k} is not a section")
    node[keys[-1]] = value


def parse_config(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate a config mapping; overrides are `dotted.key=yaml_value` strings."""
    data = dict(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"invalid override {item!r}: expected key=value, e.g. train.total_steps=50")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (None: all defaults) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return parse_config(data, overrides)
