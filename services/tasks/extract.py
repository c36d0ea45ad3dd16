"""Where a response states its final answer, for tasks whose scorer compares an answer rather
than reading the whole response (reasoning-gym's ``score_answer``, plug-ins that ask for it).

Two conventions, chosen per task with ``answer_format``:

- ``answer_tag``: the content of the last ``<answer>...</answer>`` in the response (stripped; it
  may span lines), as reasoning-gym's own prompts and prime-rl ask for;
- ``hashes``: the text after the last ``####`` up to the end of that line (stripped), as GSM8K's
  references write it.

A response without the marker has no answer (None), which its task scores 0: the format is part
of the job, and the default instruction (:data:`INSTRUCTIONS`) asks for it.
"""

from __future__ import annotations

import re
from typing import Literal

AnswerFormat = Literal["answer_tag", "hashes"]

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

INSTRUCTIONS: dict[str, str] = {
    "answer_tag": "{question}\n\nGive your final answer inside <answer></answer> tags.",
    "hashes": "{question}\n\nWrite your final answer on the last line, after ####.",
}
"""The instruction a task uses by default for each format: the question, then how to answer."""


def extract_final(response: str, answer_format: AnswerFormat) -> str | None:
    """The final answer ``response`` states under ``answer_format`` (see the module doc), or
    None when it states none.

    Raises:
        ValueError: on an unknown ``answer_format``.
    """
    if answer_format == "answer_tag":
        matches = _TAG.findall(response)
        return matches[-1].strip() if matches else None
    if answer_format == "hashes":
        if "####" not in response:
            return None
        return response.rsplit("####", 1)[1].split("\n", 1)[0].strip()
    raise ValueError(f"answer_format: expected 'answer_tag' or 'hashes', got {answer_format!r}")
