"""Load GSM8K / MATH-style JSONL files into :class:`Prompt` lists.

Each non-blank line is a JSON object with a question (``question``, or MATH's ``problem``) and
an answer (``answer``, or MATH's ``solution``). The reference answer is:
- GSM8K: the text after the last ``####`` (thousands separators removed from plain numbers);
- MATH: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched;
- otherwise the whole answer string, stripped.
An optional ``id`` field becomes the prompt id; else ``<file stem>-<line number>``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from services.tasks.base import Prompt

_QUESTION_KEYS = ("question", "problem")
_ANSWER_KEYS = ("answer", "solution")
_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Braces are matched, so nested groups such as ``\\boxed{\\frac{1}{2}}`` come out whole.
    An unclosed box returns None.
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def extract_answer(answer: str) -> str:
    """The final answer inside a GSM8K or MATH answer/solution string (see module doc)."""
    if "####" in answer:
        final = answer.rsplit("####", 1)[1].strip()
        # GSM8K sometimes writes 1,000; the verifiers compare numbers, so drop the separators.
        return final.replace(",", "") if _GROUPED_NUMBER.fullmatch(final) else final
    boxed = last_boxed(answer)
    if boxed is not None:
        return boxed
    return answer.strip()


def _field(obj: dict, keys: tuple[str, ...], where: str) -> str:
    for k in keys:
        if k in obj:
            value = obj[k]
            if not isinstance(value, str):
                raise ValueError(
                    f"{where}: field {k!r} must be a string, got {type(value).__name__}"
                )
            return value
    raise ValueError(f"{where}: missing field {' or '.join(repr(k) for k in keys)}")


def load_jsonl(path: str | Path, task: str = "math") -> list[Prompt]:
    """Read a GSM8K/MATH-style JSONL file.

    Args:
        path: The file. Blank lines are skipped.
        task: Verifier key stored on every prompt (default ``"math"``: math-verify equivalence).

    Raises:
        ValueError: naming ``path`` and the 1-based line number, on invalid JSON, a line that is
            not an object, a missing or non-string field, an empty question or an empty answer.
    """
    path = Path(path)
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            question = _field(obj, _QUESTION_KEYS, where)
            if not question.strip():
                raise ValueError(f"{where}: empty question")
            answer = extract_answer(_field(obj, _ANSWER_KEYS, where))
            if not answer:
                raise ValueError(f"{where}: empty answer")
            pid = obj.get("id")
            prompt_id = str(pid) if pid is not None else f"{path.stem}-{lineno}"
            prompts.append(Prompt(prompt_id=prompt_id, text=question, answer=answer, task=task))
    return prompts
