"""Real-model settings: configs/gsm8k.yaml validates once its paths exist; the task's prompt
format, verifier and the vLLM section are checked at validation time, with errors naming the
field; prompt rendering, the gsm8k verifier and the rollout worker's length limit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.full_vocab_model import CHAT_TEMPLATE, build_tokenizer
from services.rollout.worker import RolloutWorker
from services.run.config import ConfigError, parse_config
from services.tasks.base import Prompt
from services.tasks.prompting import PromptFormat, has_chat_template
from services.tasks.verify import gsm8k_answer, resolve_verifier

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(vocab_size=300)


@pytest.fixture
def model_dir(tmp_path, tokenizer) -> Path:
    """A model directory as validation sees it: config.json and a tokenizer with a chat template."""
    from transformers import Qwen2Config

    directory = tmp_path / "Qwen2.5-0.5B-Instruct"
    Qwen2Config(
        vocab_size=151_936,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def jsonl(tmp_path) -> Path:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}) + "\n")
    return path


def _gsm8k(model_dir: Path, jsonl: Path) -> dict:
    data = yaml.safe_load((REPO / "configs" / "gsm8k.yaml").read_text())
    data["policy"]["path"] = str(model_dir)
    data["task"]["train_path"] = data["task"]["eval_path"] = str(jsonl)
    return data


def test_gsm8k_config_validates_with_its_paths_in_place(model_dir, jsonl, monkeypatch):
    monkeypatch.setattr("services.rollout.config.vllm_installed", lambda: True)
    cfg = parse_config(_gsm8k(model_dir, jsonl))
    assert cfg.policy.path == model_dir
    assert cfg.task.type == "jsonl" and cfg.task.chat_template and cfg.task.verifier == "gsm8k"
    assert "{question}" in cfg.task.instruction and cfg.task.system_prompt
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm_settings.dtype == "bfloat16"
    assert cfg.rollout.vllm_settings.max_model_len >= (
        cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    )
    assert cfg.learner.zero_stage == 2 and cfg.learner.bf16 == "on"
    assert cfg.learner.micro_batch_tokens and cfg.learner.gradient_checkpointing


def test_gsm8k_config_fails_validation_where_the_run_would(model_dir, jsonl, tmp_path, monkeypatch):
    # As shipped: the placeholder model path does not exist.
    monkeypatch.setattr("services.rollout.config.vllm_installed", lambda: True)
    shipped = yaml.safe_load((REPO / "configs" / "gsm8k.yaml").read_text())
    shipped["task"]["train_path"] = shipped["task"]["eval_path"] = str(jsonl)
    with pytest.raises(ConfigError, match="policy.path"):
        parse_config(shipped)
    # Without vLLM installed (as in this venv), engine: vllm is refused, saying why.
    monkeypatch.setattr("services.rollout.config.vllm_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"rollout: .*vllm needs vLLM, which is not installed"):
        parse_config(_gsm8k(model_dir, jsonl))
    # A tokenizer without a chat template cannot render chat prompts.
    monkeypatch.setattr("services.rollout.config.vllm_installed", lambda: True)
    assert has_chat_template(model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "TokenizersBackend"})
    )
    assert not has_chat_template(model_dir)
    with pytest.raises(ConfigError, match="task.chat_template: the tokenizer"):
        parse_config(_gsm8k(model_dir, jsonl))


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"verifier": "nope"}, "verifier 'nope' is not registered"),
        ({"verifier": "no_such_module_x:fn"}, "cannot import 'no_such_module_x'"),
        ({"verifier": "services.tasks.verify:nothing"}, "has no attribute 'nothing'"),
        ({"verifier": "builtins:len"}, "two positional arguments"),
        ({"instruction": "Solve it."}, "instruction: must contain {question}"),
        (
            {"system_prompt": "Be brief.", "chat_template": False},
            "system_prompt: needs chat_template",
        ),
    ],
)
def test_task_prompt_and_verifier_errors_name_the_field(model_dir, jsonl, task, message):
    data = {
        "task": {"type": "jsonl", "train_path": str(jsonl), **task},
        "policy": {"path": str(model_dir)},
    }
    with pytest.raises(ConfigError, match=r"task\.jsonl") as err:
        parse_config(data)
    assert message in str(err.value)


def test_vllm_section_only_with_the_vllm_engine(monkeypatch):
    with pytest.raises(ConfigError, match="rollout: .*vllm: only read with engine: vllm"):
        parse_config({"rollout": {"vllm": {"enforce_eager": True}}})
    monkeypatch.setattr("services.rollout.config.vllm_installed", lambda: True)
    cfg = parse_config({"rollout": {"engine": "vllm", "max_new_tokens": 5}})
    assert cfg.rollout.vllm is None and cfg.rollout.vllm_settings.gpu_memory_utilization == 0.9
    with pytest.raises(ConfigError, match="vllm.max_model_len: 8 cannot hold"):
        parse_config(
            {
                "rollout": {
                    "engine": "vllm",
                    "max_new_tokens": 5,
                    "max_prompt_tokens": 4,
                    "vllm": {"max_model_len": 8},
                }
            }
        )
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        parse_config({"rollout": {"engine": "vllm", "vllm": {"gpu_memory_utilization": 1.5}}})


def test_prompt_format_renders_instruction_and_chat(tokenizer):
    p = Prompt("q1", "What is {x}? 2+3", "5", "gsm8k")
    plain = PromptFormat("{question}\nAnswer after ####.")
    assert plain.apply(tokenizer, [p])[0].text == "What is {x}? 2+3\nAnswer after ####."
    assert PromptFormat().apply(tokenizer, [p]) == [p] and PromptFormat().is_identity
    chat = PromptFormat("Q: {question}", chat_template=True, system_prompt="Be exact.")
    out = chat.apply(tokenizer, [p])[0]
    assert out.text == (
        "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n"
        "Q: What is {x}? 2+3<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (out.prompt_id, out.answer, out.task) == (p.prompt_id, p.answer, p.task)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    without = build_tokenizer(vocab_size=300)
    without.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat.render(without, "x")


def test_gsm8k_verifier():
    assert gsm8k_answer("48 + 24 = 72.\n#### 72", "72") == 1.0
    assert gsm8k_answer("#### $1,000.00", "1000") == 1.0
    assert gsm8k_answer("#### -3 apples", "-3") == 1.0
    assert gsm8k_answer("#### 7 #### 8", "7") == 0.0  # the last #### counts
    assert gsm8k_answer("The answer is 72", "72") == 0.0  # no ####
    assert gsm8k_answer("#### seventy-two", "72") == 0.0
    with pytest.raises(ValueError, match="not a number"):
        gsm8k_answer("#### 1", "n/a")
    assert resolve_verifier("gsm8k") is gsm8k_answer
    assert resolve_verifier("services.tasks.verify:gsm8k_answer") is gsm8k_answer


class _Tasks:
    """A task source whose prompts are all ``length`` characters long."""

    verifier_errors = 0

    def __init__(self, length: int) -> None:
        self.length = length

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        return [
            Prompt(f"p{i}", "1" * self.length, "1", "arithmetic") for i in rng.integers(0, 9, n)
        ]


class _Engine:
    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.version = tokenizer, 0


def test_worker_refuses_a_limit_no_prompt_fits():
    from services.policy.tokenizer import char_tokenizer

    worker = RolloutWorker(_Engine(char_tokenizer()), _Tasks(12), 2, max_prompt_tokens=11)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"rollout.max_prompt_tokens=11: only 0 of 100 prompts"):
        worker.draw_prompts(2, np.random.default_rng(0))
    assert worker.prompts_skipped_too_long == 100
    fits = RolloutWorker(_Engine(char_tokenizer()), _Tasks(12), 2, max_prompt_tokens=12)  # type: ignore[arg-type]
    assert (
        len(fits.draw_prompts(3, np.random.default_rng(0))) == 3
        and fits.prompts_skipped_too_long == 0
    )


def test_gsm8k_format_gives_credit_for_the_format_alone():
    from services.evaluation.answers import EXTRACTORS
    from services.tasks.verify import FORMAT_CREDIT, gsm8k_format_answer

    assert gsm8k_format_answer("2 + 3 = 5\n#### 5", "#### 5") == 1.0
    assert gsm8k_format_answer("#### 6", "#### 5") == FORMAT_CREDIT == 0.1
    assert gsm8k_format_answer("The answer is 5.", "#### 5") == 0.0  # right number, no format
    assert gsm8k_format_answer("#### five", "#### 5") == 0.0  # the format needs a number
    assert resolve_verifier("gsm8k_format") is gsm8k_format_answer
    key = EXTRACTORS["gsm8k_format"]
    assert key("so #### 1,000.0") == key("#### 1000") == "1000"
    assert key("#### 7 and #### 8") == "8" and key("no answer") is None


def test_format_rate_counts_samples_in_the_asked_format():
    from services.evaluation.evaluate import PromptEval, _sampled_metrics

    records = [
        PromptEval(
            "a",
            None,
            ["5", None, "6", None],
            [True, False, False, False],
            [3] * 4,
            [False] * 4,
            formatted=True,
        ),
        PromptEval(
            "b", None, [None, None, None, "1"], [False] * 4, [3] * 4, [False] * 4, formatted=True
        ),
    ]
    assert _sampled_metrics(records, [1], 4)["format_rate"] == pytest.approx(3 / 8)
    records[1].formatted = False  # a task without an extractor has no format to follow
    assert _sampled_metrics(records, [1], 4)["format_rate"] is None
