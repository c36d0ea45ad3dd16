"""Verifiers: ``(response_text, answer) -> reward in [0, 1]``, and a guard that never raises.

A task names its verifier (``task.verifier``): a key of :data:`VERIFIERS`, or an import path
``package.module:function`` to a function of the same shape; :func:`resolve_verifier` turns
either into the function, and fails at config time when the import does not resolve. A verifier
that takes a third positional argument (or sets ``takes_metadata = True``) is also given the
prompt's ``metadata`` (a reasoning-gym entry's, a data row's extra columns); call any verifier on
a prompt with :func:`score_response`.

Verifiers here may raise or (math-verify on adversarial LaTeX) take unbounded time.
:class:`SafeVerifier` turns both into a 0 reward and counts them, without signals, so it works
in rollout actors off the main thread.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import queue
import re
import threading
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

logger = logging.getLogger(__name__)

Verifier = Callable[[str, str], float]

_INT = re.compile(r"[+-]?[0-9]+")


def exact_integer(response_text: str, answer: str) -> float:
    """1.0 iff the stripped response is an ASCII integer equal to the integer ``answer``.

    Leading zeros and a sign are accepted (``"007"`` equals ``"7"``); anything else in the
    response (spaces inside, text, a decimal point) scores 0.

    Raises:
        ValueError: if ``answer`` itself is not an integer (a data error, not a wrong response).
    """
    gold = answer.strip()
    if not _INT.fullmatch(gold):
        raise ValueError(f"reference answer {answer!r} is not an integer")
    resp = response_text.strip()
    if not _INT.fullmatch(resp):
        return 0.0
    return 1.0 if int(resp) == int(gold) else 0.0


_math_verify_ready = False


def _math_verify():
    """Import math-verify lazily (it pulls in sympy, ~0.5 s) and only once."""
    global _math_verify_ready
    import math_verify
    import math_verify.grader
    import math_verify.parser

    if not _math_verify_ready:
        # We pass timeout=None (its timeout uses signal.alarm, which fails off the main thread)
        # and bound time with SafeVerifier instead, so its "timeout disabled" warning is moot.
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        _math_verify_ready = True
    return math_verify


def math_answer(response_text: str, answer: str) -> float:
    """1.0 iff math-verify finds the response's final answer equivalent to ``answer``.

    The gold answer is parsed as LaTeX math (wrapped in ``$...$`` unless already delimited);
    the response is parsed with math-verify's defaults (last ``\\boxed{}``, LaTeX or plain
    expression). No time limit here: wrap in :class:`SafeVerifier`.
    """
    mv = _math_verify()
    gold_text = answer.strip()
    if not gold_text.startswith("$"):
        gold_text = f"${gold_text}$"
    gold = mv.parse(gold_text, parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify could not parse the reference answer {answer!r}")
    pred = mv.parse(response_text, parsing_timeout=None)
    if not pred:
        return 0.0
    return 1.0 if mv.verify(gold, pred, timeout_seconds=None) else 0.0


_NUMBER = re.compile(r"[+-]?\$?\s*(\d[\d,]*(?:\.\d+)?|\.\d+)")


def first_number(text: str) -> Fraction | None:
    """The first number in ``text`` (thousands separators, a ``$`` and a trailing ``.`` allowed)
    as an exact fraction, or None."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    digits = m.group(1).replace(",", "")
    sign = -1 if m.group(0).lstrip().startswith("-") else 1
    try:
        return sign * Fraction(digits)
    except ValueError:
        return None


def gsm8k_answer(response_text: str, answer: str) -> float:
    """1.0 iff the first number after the response's last ``####`` equals the number ``answer``.

    The GSM8K convention: the model reasons, then writes ``#### <number>``. Numbers compare
    exactly (``1,000`` = ``1000`` = ``1000.0``); a response without ``####`` scores 0.

    Raises:
        ValueError: if ``answer`` holds no number (a data error, not a wrong response).
    """
    gold = first_number(answer)
    if gold is None:
        raise ValueError(f"reference answer {answer!r} is not a number")
    if "####" not in response_text:
        return 0.0
    got = first_number(response_text.rsplit("####", 1)[1])
    return 1.0 if got is not None and got == gold else 0.0


# What gsm8k_format_answer gives a response in the asked format with the wrong number.
FORMAT_CREDIT = 0.1

CORRECT_REWARD = 1.0
"""A response is correct when its verifier's reward is at least this: evaluation's accuracy and
pass@k, and the prefilter's all-right / all-wrong groups. Partial credit (``FORMAT_CREDIT``)
is reward, not correctness."""


def gsm8k_format_answer(response_text: str, answer: str) -> float:
    """:func:`gsm8k_answer` with a little credit for the format alone: 1.0 for the right number
    after the last ``####``, ``FORMAT_CREDIT`` for a wrong number there, 0 without one.

    For a model that rarely writes the asked format at first (a small instruct model): the
    format credit gives its groups reward spread to learn from before it gets answers right.
    Only 1.0 counts as correct in evaluation (accuracy and pass@k stay strict).
    """
    score = gsm8k_answer(response_text, answer)
    if score >= 1.0:
        return score
    if "####" in response_text and first_number(response_text.rsplit("####", 1)[1]) is not None:
        return FORMAT_CREDIT
    return 0.0


VERIFIERS: dict[str, Verifier] = {
    "arithmetic": exact_integer,
    "math": math_answer,
    "gsm8k": gsm8k_answer,
    "gsm8k_format": gsm8k_format_answer,
}
"""Registered verifiers by name (what ``task.verifier`` and ``Prompt.task`` name)."""

_imported: dict[str, Verifier] = {}


def resolve_verifier(spec: str) -> Verifier:
    """The verifier ``spec`` names: a key of :data:`VERIFIERS`, or ``package.module:function``
    (imported once, then cached), a callable taking (response text, reference answer).

    Raises:
        ValueError: naming ``spec`` when it is neither a registered name nor an import path that
            resolves to a callable of two positional arguments.
    """
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if spec in _imported:
        return _imported[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"verifier {spec!r} is not registered (one of {sorted(VERIFIERS)}) and is not an "
            "import path 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failing while it imports
        raise ValueError(
            f"verifier {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"verifier {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"verifier {spec!r} is not callable")
    try:
        inspect.signature(fn).bind("response", "answer")
    except TypeError:
        if not takes_metadata(fn):
            raise ValueError(
                f"verifier {spec!r} must accept (response_text, answer) as two positional "
                "arguments (or three, with the prompt's metadata)"
            ) from None
    except ValueError:  # no signature to inspect (some builtins): trust it
        pass
    _imported[spec] = fn
    return fn


def takes_metadata(fn: Callable) -> bool:
    """Whether ``fn`` is called with the prompt's metadata as a third argument: it says so
    (``takes_metadata = True``), or its signature takes exactly three positional arguments
    (a guarded :class:`SafeVerifier` always accepts it)."""
    flag = getattr(fn, "takes_metadata", None)
    if flag is not None:
        return bool(flag)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) == 3


def score_response(verify: Callable, prompt: Any, response: str) -> float:
    """``verify``'s reward for ``response`` to ``prompt`` (a :class:`~services.tasks.base.Prompt`):
    called with (response, answer), plus the prompt's metadata when the verifier takes it."""
    if takes_metadata(verify):
        return verify(response, prompt.answer, getattr(prompt, "metadata", {}))
    return verify(response, prompt.answer)


class SafeVerifier:
    """Call a verifier with a time limit; any failure is a 0 reward, counted, never raised.

    Calls run on one long-lived daemon worker thread and the caller waits at most
    ``timeout_s`` for each (a thread per call cost more than the verification itself: 4% of
    a rollout actor's time in a profile of the quickstart). Python cannot kill a thread, so a
    worker stuck in a hanging verifier is abandoned and a fresh one takes the next call;
    ``abandoned`` says how many stuck workers are still running. Daemon threads do not block
    interpreter exit.

    Attributes:
        errors: Calls that raised, timed out or returned a non-finite / non-number result.
        timeouts: The subset of ``errors`` that exceeded ``timeout_s``.
        calls: All calls.
    """

    takes_metadata = True  # passed on to ``fn`` only when it takes it

    def __init__(self, fn: Verifier, timeout_s: float | None = 2.0) -> None:
        self.fn = fn
        self._with_metadata = takes_metadata(fn)
        self.timeout_s = timeout_s
        self.errors = 0
        self.timeouts = 0
        self.calls = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None
        self._stuck: list[threading.Thread] = []

    @property
    def abandoned(self) -> int:
        """Timed-out verifier workers that have not finished yet."""
        return sum(1 for t in self._stuck if t.is_alive())

    def _fail(self, response: str, reason: str, timeout: bool = False) -> float:
        with self._lock:
            self.errors += 1
            self.timeouts += int(timeout)
            n = self.errors
        # First few at WARNING so a broken verifier is visible; the rest at DEBUG.
        level = logging.WARNING if n <= 5 else logging.DEBUG
        logger.log(
            level, "verifier %s failed (%s) on response %.80r", _name(self.fn), reason, response
        )
        return 0.0

    def _run(self, args: tuple, box: dict[str, object]) -> None:
        try:
            box["value"] = self.fn(*args)
        except BaseException as e:
            box["error"] = e

    def _serve(self, jobs: queue.SimpleQueue) -> None:
        while True:
            args, box, done = jobs.get()
            self._run(args, box)
            done.set()

    def _submit(self, args: tuple, box: dict[str, object]) -> threading.Event:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._jobs = queue.SimpleQueue()
                self._worker = threading.Thread(
                    target=self._serve,
                    args=(self._jobs,),
                    daemon=True,
                    name=f"safe-verifier-{id(self):x}",
                )
                self._worker.start()
            jobs = self._jobs
        done = threading.Event()
        assert jobs is not None
        jobs.put((args, box, done))
        return done

    def _abandon_worker(self) -> None:
        # The worker is stuck in a call that outlived its limit: later calls get a new one.
        with self._lock:
            if self._worker is not None:
                self._stuck.append(self._worker)
            self._worker, self._jobs = None, None

    def __call__(
        self, response: str, answer: str, metadata: Mapping[str, Any] | None = None
    ) -> float:
        with self._lock:
            self.calls += 1
        box: dict[str, object] = {}
        args = (response, answer, metadata or {}) if self._with_metadata else (response, answer)
        if self.timeout_s is None:
            self._run(args, box)
        elif not self._submit(args, box).wait(self.timeout_s):
            self._abandon_worker()
            return self._fail(response, f"timeout after {self.timeout_s} s", timeout=True)
        if "error" in box:
            e = box["error"]
            return self._fail(response, f"{type(e).__name__}: {e}")
        value = box.get("value")
        try:
            reward = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return self._fail(response, f"returned {value!r}")
        if not math.isfinite(reward):
            return self._fail(response, f"returned {value!r}")
        return reward


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)
