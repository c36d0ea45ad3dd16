"""The run configuration: one YAML file, validated by typed models before anything starts.

Every section forbids unknown keys, so a typo (`prompt_per_step`) fails with its dotted path
instead of silently taking a default. Batch sizes say what they count: prompts or samples.
Each component's section is defined beside the component; this module composes them and is
the only place that sees the whole run (it hands each component its own settings).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from learner.config import LearnerConfig
from learner.settings import LearnerServiceSettings
from selector.config import AlgorithmConfig, SelectorSettings
from services.common.secrets import mask_url, redact_config
from services.common.settings import settings_from
from services.policy.config import PolicyConfig, WarmstartConfig
from services.policy.limits import ModelLimits
from services.rollout.config import RolloutConfig
from services.rollout.reward import RewardConfig
from services.rollout.settings import RolloutSettings
from services.tasks.config import ArithmeticTaskConfig, MixedTaskConfig, TaskConfig
from services.weightsync.config import WeightSyncConfig


class ConfigError(ValueError):
    """An invalid configuration; the message names each wrong field by its dotted path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Section):
    """Length of the run, what it records, where it lives."""

    total_steps: int = Field(200, ge=1)
    """Learner steps (one curated batch each); the schedules span them unless
    ``schedule_steps`` says otherwise."""
    schedule_steps: int | None = Field(None, ge=1)
    """The horizon of the keep-ratio schedule (rho_s, K) and of the learning-rate schedule:
    both reach their final values at this step and hold them after it. None: ``total_steps``
    at the run's first start. A resumed run keeps the horizon it started with, so raising
    ``total_steps`` extends a run with its schedules at their final values instead of
    stretching them (see docs/architecture.md, "Resuming a run")."""
    eval_every: int = Field(10, ge=1)
    """Held-out evaluation every this many steps (and at the first and last)."""
    checkpoint_every: int = Field(50, ge=1)
    """Learner checkpoint every this many steps (and at the last)."""
    seed: int = 0
    """Run seed; every step's randomness derives from it."""
    run_dir: Path = Path("runs/d3s")
    """Checkpoints, metrics.jsonl, TensorBoard, logs, plots and the final policy. Unless given,
    ``runs/<name>`` (the run's ``name``, characters other than letters, digits, ``.``, ``_`` and
    ``-`` made ``-``), so a renamed run never lands in another run's directory. A directory
    that already holds a run is resumed if the config's differences are safe on resume
    (:mod:`services.run.resume`), else refused."""
    resume: bool = True
    """Continue from the run directory's latest checkpoint (``d3s train``)."""
    progress_bar: bool = True
    """One live progress line on the terminal."""

    @property
    def horizon(self) -> int:
        """The step at which the schedules reach their final values (``schedule_steps``, else
        ``total_steps``)."""
        return self.schedule_steps if self.schedule_steps is not None else self.total_steps


class EvalConfig(_Section):
    """The held-out evaluation every run logs every ``train.eval_every`` steps (and ``d3s eval``).

    Greedy accuracy (logged as ``heldout_accuracy`` and ``eval/greedy_accuracy``), then
    ``n_samples`` sampled responses per held-out prompt give the unbiased pass@k, maj@k and the
    mean response length (``eval/pass@k``, ``eval/maj@k``, ``eval/mean_response_length``; per
    difficulty with a ``/d<level>`` suffix on the mixed task). Its cost is
    ``task.heldout_size x n_samples`` sampled responses per evaluation.
    """

    n_samples: int = Field(16, ge=0, le=1024)
    """Responses sampled per held-out prompt; 0: greedy accuracy only (then ``ks`` must be empty)."""
    ks: list[int] = Field(default_factory=lambda: [1, 8], max_length=8)
    """The k of pass@k and maj@k; each in 1..n_samples (the unbiased estimator needs n >= k)."""
    temperature: float | None = Field(None, gt=0)
    """Sampling temperature; None: ``rollout.temperature`` (what training samples at)."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus threshold; None: ``rollout.top_p``."""
    greedy: bool = True
    """Also measure greedy accuracy. Without it ``heldout_accuracy`` is pass@1 (sampled)."""
    seed: int = Field(0, ge=0)
    """Sampling seed: the same at every evaluation, so curves compare policies, not draws."""
    batch_size: int = Field(64, ge=1)
    """Prompts per generation call (``batch_size x n_samples`` rows)."""
    background: bool = True
    """Under ``d3s run``: evaluate a snapshot of the weights in a Ray actor of its own, so the
    learner goes on training meanwhile; the result joins its step's row when it is ready.
    false: the learner evaluates between steps. ``d3s train`` (one process) always does the
    latter."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs the background evaluator reserves (0: it evaluates on CPU)."""
    max_pending: int = Field(2, ge=1, le=16)
    """Snapshots waiting for the background evaluator at most; one more makes the learner wait,
    so slow evaluations hold training back instead of piling weights up in memory."""

    @model_validator(mode="after")
    def _ks_fit(self) -> EvalConfig:
        if any(k < 1 for k in self.ks):
            raise ValueError(f"ks: each k must be >= 1, got {self.ks}")
        if self.n_samples == 0 and self.ks:
            raise ValueError("ks: must be empty when n_samples is 0 (greedy only)")
        if self.ks and max(self.ks) > self.n_samples:
            raise ValueError(
                f"n_samples: {self.n_samples} is below max(ks)={max(self.ks)}; "
                "pass@k needs at least k samples per prompt"
            )
        if not self.greedy and self.n_samples == 0:
            raise ValueError("greedy: false with n_samples 0 measures nothing")
        return self


class ServiceConfig(_Section):
    """The asynchronous service: Redis, Ray, and the bounds between components."""

    mode: Literal["async", "sync"] = "async"
    """``async``: rollouts run ahead of the learner within max_staleness; ``sync``: lock-step."""
    redis_url: str | None = None
    """Use this Redis; None: $D3S_REDIS_URL, else start an embedded one in the run directory."""
    ray_address: str | None = None
    """Join this Ray cluster; None: start a local one."""
    namespace: str = Field("d3s", pattern=r"^[A-Za-z0-9_.-]+$")
    """Prefix of every Redis key of the run."""
    max_staleness: int = Field(1, ge=0)
    """Weight versions a group may lag the step that uses it; 0 is strictly on-policy."""
    max_group_backlog: int = Field(256, ge=1)
    """Rollout actors pause while this many groups are queued."""
    max_batch_backlog: int = Field(2, ge=1)
    """The selector pauses while this many batches are queued."""
    wait_timeout_s: float = Field(300.0, gt=0)
    """Every wait without progress fails with a message after this long."""
    max_abs_reward: float = Field(1e6, gt=0)
    """A group with a reward beyond +-this is dead-lettered (a verifier gone wrong)."""
    max_restarts: int = Field(5, ge=0, le=1000)
    """Times the supervisor re-creates each component (selector, learner, each rollout actor)
    whose process died (kill -9, out of memory) before it stops the run; 0: never. A component
    that raises an error is not restarted: the run stops with that error."""
    restart_backoff_s: float = Field(1.0, ge=0, le=600)
    """Wait before a component's first restart; doubled for each further one (at most 60 s)."""
    redis_outage_s: float = Field(60.0, gt=0, le=86_400)
    """How long a lost Redis is waited out (the embedded one is restarted from its AOF; every
    client reconnects with back-off) before the run stops; ``d3s run`` again resumes it."""
    redis_maxmemory_mb: int = Field(1024, ge=0)
    """``maxmemory`` of the embedded Redis (policy ``noeviction``: when full it refuses writes
    and never evicts run state); 0: no limit."""


class ApiConfig(_Section):
    """The HTTP endpoint (schedule, metrics, dashboard, control)."""

    enabled: bool = True
    """Serve the API during ``d3s run``."""
    host: str = "127.0.0.1"
    """Bind address; loopback unless you mean to expose it."""
    port: int = Field(8000, ge=0, le=65535)
    """Port; 0 picks a free one."""
    control_token_env: str = "D3S_CONTROL_TOKEN"
    """Environment variable holding the bearer token for POST /control/*."""


class WandbConfig(_Section):
    """A Weights & Biases run fed the same per-step rows as TensorBoard."""

    project: str = Field(..., min_length=1)
    """W&B project the run is logged to."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """``offline`` writes ``run_dir/wandb/`` and needs no network (``wandb sync`` uploads it
    later); ``online`` streams to the W&B server (needs a login); ``disabled`` logs nothing."""
    name: str | None = None
    """The run's name in W&B; None: W&B picks one."""
    group: str | None = None
    """W&B group, to compare runs (e.g. the presets of an ablation)."""
    tags: list[str] | None = None
    """W&B tags of the run."""


class LoggingConfig(_Section):
    """Where each step's metric row goes besides ``run_dir/metrics.jsonl`` (always written)."""

    tensorboard: bool = True
    """Mirror the rows to TensorBoard in ``run_dir/tensorboard/``."""
    wandb: WandbConfig | None = None
    """Also log to Weights & Biases (needs the ``wandb`` extra); None: no W&B."""


class RunConfig(_Section):
    """One run: every section, validated together."""

    name: str = "d3s"
    """Names the run in logs and plots, and its run directory (``runs/<name>``) unless
    ``train.run_dir`` is given."""
    task: TaskConfig = ArithmeticTaskConfig()
    policy: PolicyConfig = PolicyConfig()
    warmstart: WarmstartConfig = WarmstartConfig()
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    reward: RewardConfig = RewardConfig()
    """Shaping added to the verifier's reward of every training response (overlong); not
    evaluation's."""
    learner: LearnerConfig = LearnerConfig()
    eval: EvalConfig = EvalConfig()
    train: TrainConfig = TrainConfig()
    service: ServiceConfig = ServiceConfig()
    api: ApiConfig = ApiConfig()
    logging: LoggingConfig = LoggingConfig()
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    """How the learner's weights reach the rollout engines: the Ray object store (default),
    a bucketed collective broadcast, or safetensors files on a shared path."""

    @model_validator(mode="before")
    @classmethod
    def _run_dir_follows_name(cls, data: Any) -> Any:
        # Before validation, where "not given" can still be told from "given as the default".
        if not isinstance(data, dict):
            return data
        name = data.get("name", "d3s")
        train = data.get("train")
        if not isinstance(name, str):
            return data  # the name's own validation reports it
        if train is None:
            return {**data, "train": {"run_dir": run_dir_for(name)}}
        if isinstance(train, dict) and "run_dir" not in train:
            return {**data, "train": {**train, "run_dir": run_dir_for(name)}}
        if isinstance(train, TrainConfig) and "run_dir" not in train.model_fields_set:
            return {**data, "train": train.model_copy(update={"run_dir": run_dir_for(name)})}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if abs(self.learner.temperature - self.rollout.temperature) > 1e-12:
            raise ValueError(
                "learner.temperature must equal rollout.temperature: the learner must "
                "score the distribution the rollouts were sampled from"
            )
        if self.policy.path is None and not isinstance(
            self.task, ArithmeticTaskConfig | MixedTaskConfig
        ):
            raise ValueError(
                "policy.path: required unless task.type is 'arithmetic' or 'mixed' "
                "(the built-in warm start only knows the built-in tasks)"
            )
        if self.policy.path is not None and not (Path(self.policy.path) / "config.json").is_file():
            raise ValueError(
                f"policy.path: {self.policy.path} is not a model directory (no config.json)"
            )
        if getattr(self.task, "chat_template", False):
            from services.tasks.prompting import has_chat_template

            if self.policy.path is None or not has_chat_template(self.policy.path):
                raise ValueError(
                    f"task.chat_template: the tokenizer in policy.path={self.policy.path} "
                    "has no chat template"
                )
        if self.service.max_group_backlog < self.rollout.prompts_per_step:
            raise ValueError(
                f"service.max_group_backlog: {self.service.max_group_backlog} is below "
                f"rollout.prompts_per_step={self.rollout.prompts_per_step}; rollouts would stop "
                "before the selector had one step's groups"
            )
        if self.weight_sync.engine_digest and not (
            self.rollout.engine == "vllm" and self.weight_sync.transport == "collective"
        ):
            raise ValueError(
                "weight_sync.engine_digest: only read with rollout.engine vllm and "
                "weight_sync.transport collective (the engines that receive in their workers)"
            )
        overlong = self.reward.overlong
        if overlong is not None and overlong.max_len > self.rollout.max_new_tokens:
            raise ValueError(
                f"reward.overlong.max_len: {overlong.max_len} exceeds rollout.max_new_tokens="
                f"{self.rollout.max_new_tokens}; no response can be that long, so the full "
                "penalty would never apply"
            )
        if self.rollout.inflight_updates and self.service.mode == "sync":
            raise ValueError(
                "rollout.inflight_updates: only read with service.mode async (in lock-step no "
                "new weights can arrive while a round generates)"
            )
        if self.service.mode == "sync" and self.rollout.num_actors > self.rollout.prompts_per_step:
            raise ValueError(
                f"rollout.num_actors: {self.rollout.num_actors} exceeds prompts_per_step="
                f"{self.rollout.prompts_per_step}; in mode sync every actor needs a share of a step"
            )
        self._vllm_fits_on_cpu()
        return self

    def _vllm_fits_on_cpu(self) -> None:
        """vLLM engines on this machine's CPU: their KV caches must fit in the RAM available
        here beside the learner and the models, or the engines would fail at start."""
        if (
            self.rollout.engine != "vllm"
            or self.rollout.num_gpus > 0
            or self.policy.path is None  # the built-in policy: its model is made at start
            or self.service.ray_address is not None  # the engines run on other machines
            or os.environ.get("RAY_ADDRESS")
        ):
            return
        from services.rollout.vllm_memory import (
            available_ram_bytes,
            check_cpu_fit,
            read_model_memory,
        )

        check_cpu_fit(
            self.rollout,
            read_model_memory(self.policy.path),
            learner_ranks=self.learner.world_size,
            micro_batch_tokens=self.learner.micro_batch_tokens,
            background_eval=self.eval.background,
            available=available_ram_bytes(),
        )

    def control_token(self) -> str | None:
        return os.environ.get(self.api.control_token_env) or None

    # ---- each component's settings -------------------------------------------------------------
    # A settings field takes the field of the same name from the one run-level section that has
    # it (services.common.settings); only values derived here are passed by name.

    def _run_sections(self) -> dict[str, BaseModel]:
        sections = {"train": self.train, "rollout": self.rollout, "service": self.service}
        return {**sections, "algorithm": self.algorithm}

    def selector_settings(self, limits: ModelLimits | None = None) -> SelectorSettings:
        """``limits``: the policy's vocabulary and context, to refuse groups outside them."""
        return settings_from(
            SelectorSettings,
            self._run_sections(),
            preset=self.algorithm.build_preset(),
            schedule_steps=self.train.horizon,
            vocab_size=limits.vocab_size if limits else None,
            max_positions=limits.max_positions if limits else None,
        )

    def learner_settings(self, run_dir: Path | None = None) -> LearnerServiceSettings:
        preset = self.algorithm.build_preset()
        return settings_from(
            LearnerServiceSettings,
            self._run_sections(),
            preset=preset,
            run_dir=Path(run_dir or self.train.run_dir),
            title=f"{self.name} ({preset.name}, {self.service.mode})",
        )

    def rollout_settings(self) -> RolloutSettings:
        return settings_from(
            RolloutSettings, self._run_sections(), lock_step=self.service.mode == "sync"
        )

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-ready data, for the API, the run directory and W&B, with no
        secrets: the control token lives in the environment (only its variable's name is here)
        and a password in a URL (``service.redis_url``) is masked."""
        return redact_config(self.model_dump(mode="json"))[0]

    def stored(self) -> dict[str, Any]:
        """The config as the run directory keeps it, to compare a resumed run's against: every
        field as given, only the Redis URL's password masked. Not :meth:`redacted`, whose
        name-based masking would also hide settings such as ``learner.token_pass`` and so let
        a change of them through unnoticed."""
        data = self.model_dump(mode="json")
        if data["service"].get("redis_url"):
            data["service"]["redis_url"] = mask_url(data["service"]["redis_url"])
        return data

    def logger_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the run's metric logger (``RunReporter`` -> ``RunLogger``)."""
        wandb = self.logging.wandb.model_dump(exclude_none=True) if self.logging.wandb else None
        return {"tensorboard": self.logging.tensorboard, "wandb": wandb, "config": self.redacted()}


def run_dir_for(name: str) -> Path:
    """The run directory of a run called ``name`` when the config gives none: ``runs/<name>``,
    with anything but letters, digits, ``.``, ``_`` and ``-`` replaced so the name stays one
    path component."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return Path("runs") / (safe or "d3s")


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
            raise ConfigError(
                f"invalid override {item!r}: expected key=value, e.g. train.total_steps=50"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem", None) or "not YAML"
            raise ConfigError(
                f"invalid override {item!r}: the value after '=' is read as YAML and this one is "
                f"not ({mark}); quote a text value, e.g. {key.strip()}='\"...\"'"
            ) from None
        _set_dotted(data, key.strip(), value)
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
