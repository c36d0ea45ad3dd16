"""Answer extraction for majority voting: response text -> canonical answer key, or None.

Keys are compared for equality only, so an extractor must map responses that its task's
verifier treats as the same answer to the same key (``"007"`` and ``"7"`` for integers).
Extractors are keyed like ``services.tasks.verify.VERIFIERS`` (by ``Prompt.task``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from services.tasks.jsonl import last_boxed
from services.tasks.verify import first_number

AnswerExtractor = Callable[[str], "str | None"]

# Same grammar as the exact_integer verifier: the whole stripped response is the integer.
_INT = re.compile(r"[+-]?[0-9]+")
_SPACE = re.compile(r"\s+")


def integer_answer(response_text: str) -> str | None:
    """The integer the ``exact_integer`` verifier would read, in canonical form (``"-7"``,
    ``"7"``), or None when that verifier would score the response 0 whatever the reference."""
    text = response_text.strip()
    if not _INT.fullmatch(text):
        return None
    return str(int(text))


def boxed_answer(response_text: str) -> str | None:
    """Content of the last ``\\boxed{}`` with all whitespace removed, or None.

    A string key, so answers that are equal only mathematically (``\\frac12`` vs ``0.5``) vote
    apart; that splits votes between forms but never merges different answers.
    """
    boxed = last_boxed(response_text)
    if boxed is None:
        return None
    key = _SPACE.sub("", boxed)
    return key or None


def gsm8k_answer_key(response_text: str) -> str | None:
    """The number the ``gsm8k`` verifier reads (the first after the last ``####``), as a
    canonical fraction string (``"1000"`` for ``1,000.0``), or None without ``####`` or number."""
    if "####" not in response_text:
        return None
    number = first_number(response_text.rsplit("####", 1)[1])
    return None if number is None else str(number)


EXTRACTORS: dict[str, AnswerExtractor] = {
    "arithmetic": integer_answer,
    "math": boxed_answer,
    "gsm8k": gsm8k_answer_key,
    "gsm8k_format": gsm8k_answer_key,
}


def extractor_for(task: str) -> AnswerExtractor:
    """The registered extractor for ``task`` (a ``Prompt.task`` key).

    Raises:
        KeyError: naming the task and the known keys.
    """
    try:
        return EXTRACTORS[task]
    except KeyError:
        raise KeyError(
            f"no answer extractor for task {task!r}; known: {sorted(EXTRACTORS)}"
        ) from None
