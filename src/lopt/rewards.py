"""Verifiable rewards for ``lopt grpo``: GSM8K answers, ``\\boxed{}`` math answers, answer format,
and custom reward functions loaded by dotted path.

Every reward function has TRL's signature: ``fn(completions, **kwargs) -> list[float]``, where a
completion is a string or a list of chat messages (the assistant's reply) and ``kwargs`` holds the
dataset's other columns, one list entry per completion; the built-in accuracy rewards read the
reference answer from the ``answer`` column.

    >>> gsm8k_answer("so she has 1,250 dollars left.\\n#### $1,250")
    1250.0
    >>> math_answers_equal("\\\\frac{1}{2}", "0.5")
    True

``\\boxed{}`` answers are compared by math-verify (the checker of TRL's accuracy reward and of
open-r1) when it is installed (``pip install "lopt[math]"``); lopt's own LaTeX normaliser
(``normalized_answers_equal``) is the fallback, with a one-time note saying how to install
math-verify. docs/rewards-math-verify.md measures where the two disagree and which is right.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from lopt.eval.generation import NUMBER_RE, extract_answer


ANSWER_FORMATS = ("gsm8k", "boxed")
RewardFunc = Callable[..., list[float]]


class RewardError(ValueError):
    """A reward that cannot be loaded or used; the message is one line saying what to do."""


# --------------------------------------------------------------------------- completions


def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is; for chat messages, the content of the last
    assistant message (or of the last message when none is marked assistant)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        msgs = [m for m in completion if isinstance(m, dict)]
        replies = [m for m in msgs if m.get("role") == "assistant"] or msgs
        return _content(replies[-1].get("content")) if replies else ""
    return "" if completion is None else str(completion)


def _content(value: Any) -> str:
    if isinstance(value, list):  # content parts: [{'type': 'text', 'text': ...}]
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in value)
    return "" if value is None else str(value)


# --------------------------------------------------------------------------- GSM8K

_UNSIGNED = r"((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
# lopt eval's number (optional "$" and sign, thousands commas, decimals), optionally followed by
# "/ denominator": "7/2" is one answer (3.5), not the number 2.
_ANSWER = re.compile(NUMBER_RE.pattern + r"(?:\s*/\s*" + _UNSIGNED + r"(?![\d.]))?")
_FORMAT_LINE = re.compile(r"^[ \t]*####[ \t]*(?:\$[ \t]?)?-?\$?(?:\d|\.\d)", re.MULTILINE)


def _answer_value(m: re.Match) -> float | None:
    value = float(m.group(2).replace(",", ""))
    if m.group(3) is not None:
        denominator = float(m.group(3).replace(",", ""))
        if denominator == 0:
            return None
        value /= denominator
    return -value if m.group(1) else value


def gsm8k_answer(text: str) -> float | None:
    """The numeric answer of a GSM8K-style solution: the first number after the last ``####`` when
    one follows it, else the last number in the text; None when there is none.

    The rule of ``lopt eval``'s ``extract_answer`` (``1,234``, ``-5``, ``$12``, ``3.50``, trailing
    words and periods), plus fractions: ``#### 7/2`` is 3.5.
    """
    if "####" in text:
        m = _ANSWER.search(text.rsplit("####", 1)[1])
        if m is not None:
            return _answer_value(m)
    matches = list(_ANSWER.finditer(text))
    if not matches:
        return extract_answer(text)  # the same rule finds nothing either: None
    return _answer_value(matches[-1])


def numbers_equal(a: float | None, b: float | None) -> bool:
    """Equal up to float noise (3.50 == 3.5, 0.1 + 0.2 == 0.3); None never equals anything."""
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def gsm8k_correct(completion: str, reference: str | float) -> bool:
    """Does the completion's GSM8K answer equal the reference (a number, ``"72"``, or a whole
    reference solution ending in ``#### 72``)?"""
    ref = float(reference) if isinstance(reference, (int, float)) else gsm8k_answer(str(reference))
    return numbers_equal(gsm8k_answer(completion), ref)


def has_gsm8k_format(completion: str) -> bool:
    """True when a line of the completion is ``#### <number>``."""
    return _FORMAT_LINE.search(completion) is not None


# --------------------------------------------------------------------------- boxed math


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces kept
    whole; ``\\boxed 5`` (no braces) gives ``5``. None when there is no complete box."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    for m in reversed(starts):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            inner = _braced(text, i)
            if inner is not None:
                return inner
        else:
            tail = re.match(r"[^\s$]+", text[i:])
            if tail:
                return tail.group(0)
    return None


def _braced(text: str, open_at: int) -> str | None:
    """Content of the brace group opening at ``text[open_at] == '{'``; None if it never closes."""
    depth = 0
    for j in range(open_at, len(text)):
        c = text[j]
        if c == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif c == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[open_at + 1: j]
    return None


def _replace_command(s: str, name: str, n_args: int, render: Callable[..., str]) -> str:
    """Replace every ``\\name{a}{b}`` (``n_args`` brace groups, nested braces allowed) by
    ``render(a, b)``; single-character arguments without braces (``\\frac12``) count too."""
    out, i = [], 0
    pattern = re.compile(r"\\" + name + r"(?![a-zA-Z])")
    while True:
        m = pattern.search(s, i)
        if m is None:
            out.append(s[i:])
            return "".join(out)
        j, args = m.end(), []
        for _ in range(n_args):
            while j < len(s) and s[j] == " ":
                j += 1
            if j < len(s) and s[j] == "{":
                inner = _braced(s, j)
                if inner is None:
                    break
                args.append(inner)
                j += len(inner) + 2
            elif j < len(s) and s[j] not in "\\}":
                args.append(s[j])
                j += 1
            else:
                break
        if len(args) < n_args:  # malformed: leave the rest untouched
            out.append(s[i:])
            return "".join(out)
        out.append(s[i: m.start()])
        out.append(render(*args))
        i = j


_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_TEXT_COMMANDS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mbox", "operatorname")


def normalize_math_answer(answer: str) -> str:
    """A canonical string for a final math answer, so that equivalent ways of writing it compare
    equal: no spaces or LaTeX spacing, no ``\\left``/``\\right``, ``\\text{}`` unwrapped (a trailing
    ``\\text{ units}`` dropped), no degree signs, ``$``, ``\\$`` or ``%``, ``\\dfrac``/``\\frac`` as
    ``(a)/(b)``, ``\\sqrt{x}`` as ``sqrt(x)``, thousands commas removed, a leading ``x =`` dropped,
    no trailing period."""
    s = answer.strip()
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s+[^{}]*\}\s*$", "", s) or s  # "5\text{ cm}": units
    for cmd in _TEXT_COMMANDS:
        s = _replace_command(s, cmd, 1, lambda a: a)
    s = _SPACING.sub("", s)
    s = re.sub(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\displaystyle", "", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = _replace_command(s, "frac", 2, lambda a, b: f"({a})/({b})")
    s = _replace_command(s, "sqrt", 1, lambda a: f"sqrt({a})")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    m = re.fullmatch(r"[a-zA-Z]\w*=([^=]+)", s)  # "x=5" -> "5"
    if m:
        s = m.group(1)
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _braced(s, 0) == s[1:-1]:
        s = s[1:-1]
    return s


_PLAIN = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def math_value(answer: str) -> float | None:
    """The number a normalised answer denotes (``3``, ``-0.5``, ``(1)/(2)``, ``-7/2``), else None."""
    s = answer
    sign = -1.0 if s.startswith("-") else 1.0
    s = s[1:] if s[:1] in "+-" else s
    if _PLAIN.fullmatch(s):
        return sign * float(s)
    m = re.fullmatch(r"\(?([+-]?(?:\d+(?:\.\d*)?|\.\d+))\)?/\(?([+-]?(?:\d+(?:\.\d*)?|\.\d+))\)?", s)
    if m and float(m.group(2)) != 0:
        return sign * float(m.group(1)) / float(m.group(2))
    return None


def _split_top_level(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _normalized_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    va, vb = math_value(a), math_value(b)
    if va is not None and vb is not None:
        return numbers_equal(va, vb)
    # Tuples and intervals, element by element: "(0.5, 2]" vs "(\frac12,2]".
    if len(a) >= 2 and len(b) >= 2 and a[0] == b[0] and a[-1] == b[-1] and a[0] in "([" and a[-1] in ")]":
        pa, pb = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
        if len(pa) == len(pb) and len(pa) > 1:
            return all(_normalized_equal(x, y) for x, y in zip(pa, pb))
    return False


def normalized_answers_equal(prediction: str | None, reference: str | None) -> bool:
    """lopt's own checker: do two final math answers mean the same after ``normalize_math_answer``
    (equal strings, equal numbers such as ``\\frac{1}{2}``, ``1/2`` and ``0.5``, or tuples and
    intervals equal element by element)? An empty or missing prediction is never correct. What
    ``math_answers_equal`` uses where math-verify is not installed."""
    if prediction is None or reference is None:
        return False
    a, b = normalize_math_answer(prediction), normalize_math_answer(reference)
    return bool(a) and _normalized_equal(a, b)


# --------------------------------------------------------------------------- math-verify

MATH_VERIFY_INSTALL = 'pip install "lopt[math]" (or: pip install "math-verify[antlr4_13_2]")'
_math_verify_cache: dict[str, Any] = {}


def math_verify_available() -> bool:
    """True when math-verify (with its LaTeX parser) can be imported."""
    return _math_verify() is not None


def _math_verify() -> tuple[Callable, Callable, list] | None:
    if "api" not in _math_verify_cache:
        try:
            from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
        except ImportError:
            _math_verify_cache["api"] = None
        else:
            # The box is the answer: match it first, then a bare expression.
            _math_verify_cache["api"] = (parse, verify, [LatexExtractionConfig(boxed_match_priority=0),
                                                         ExprExtractionConfig()])
    return _math_verify_cache["api"]


def _note_fallback_once() -> None:
    if not _math_verify_cache.get("noted"):
        _math_verify_cache["noted"] = True
        print("lopt: math-verify is not installed, so \\boxed{} answers are checked by lopt's own LaTeX "
              f"normaliser, which accepts fewer equivalent forms; install it with: {MATH_VERIFY_INSTALL}",
              file=sys.stderr)


# Digits grouped by LaTeX spacing: "1\,000", "1\ 000", "1{,}000", "1~000".
_DIGIT_GROUPS = re.compile(r"(?<=\d)(?:\\[,;: ]|\{,\}|~)(?=\d{3}(?!\d))")


def clean_for_math_verify(answer: str) -> str:
    """Rewrite four spellings that math-verify 0.9 reads wrongly: thousands grouped by LaTeX spacing
    (it read ``1\\,000`` as 1*0 = 0, which matched a reference of 0), the period that ends a sentence
    (``3.`` matched nothing), the Unicode degree sign (``90°``) and a final percent sign, which is
    dropped as lopt's own normaliser drops it (math-verify matched ``50\\%`` with 50 but not
    ``12.5\\%`` with 12.5; the price: 0.25 no longer matches a reference of ``25\\%``)."""
    s = _DIGIT_GROUPS.sub("", answer.strip())
    s = s.replace("°", "^\\circ")
    s = re.sub(r"\s*\\?%\s*$", "", s)
    return re.sub(r"(?<=[\d}])\s*\.$", "", s)


def math_verify_equal(prediction: str | None, reference: str | None) -> bool:
    """math-verify's verdict on two final answers (box contents), each passed through
    ``clean_for_math_verify``. A reference that math-verify cannot read at all is compared by
    ``normalized_answers_equal``. Raises RewardError when math-verify is not installed."""
    api = _math_verify()
    if api is None:
        raise RewardError(f"math-verify is not installed; {MATH_VERIFY_INSTALL}")
    if prediction is None or reference is None or not prediction.strip():
        return False
    parse, verify, config = api
    # math-verify's timeouts use signal.alarm, which works only in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if timeout is None:  # and then it warns on every call that the timeout is off
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
    gold = parse("\\boxed{" + clean_for_math_verify(reference) + "}", extraction_config=config,
                 parsing_timeout=timeout)
    if not gold:
        return normalized_answers_equal(prediction, reference)
    pred = parse("\\boxed{" + clean_for_math_verify(prediction) + "}", extraction_config=config,
                 parsing_timeout=timeout)
    return bool(pred) and bool(verify(gold, pred, timeout_seconds=timeout))


def boxed_checker() -> str:
    """Which checker ``\\boxed{}`` answers go through: ``"math-verify"``, or ``"lopt"`` (after the
    one-time note on how to install math-verify). For commands to call at startup and to record."""
    if math_verify_available():
        return "math-verify"
    _note_fallback_once()
    return "lopt"


def math_answers_equal(prediction: str | None, reference: str | None) -> bool:
    """Do two final math answers (``\\boxed{}`` contents) mean the same? math-verify decides when it
    is installed (``math_verify_equal``), else lopt's ``normalized_answers_equal``, with a one-time
    note on stderr saying how to install math-verify. An empty or missing prediction is never
    correct."""
    if not math_verify_available():
        _note_fallback_once()
        return normalized_answers_equal(prediction, reference)
    return math_verify_equal(prediction, reference)


def boxed_reference(solution: str) -> str:
    """The reference answer of a solution: its last ``\\boxed{}``, or the whole text when it has
    no box (an ``answer`` column that holds just the answer)."""
    boxed = extract_boxed(solution)
    return boxed if boxed is not None else solution.strip()


# --------------------------------------------------------------------------- reward functions


def _references(answer: Sequence[Any] | None, n: int, name: str) -> list[Any]:
    if answer is None:
        raise RewardError(f"the {name} reward needs an 'answer' column with the reference answers in the "
                          f"dataset")
    if len(answer) != n:
        raise RewardError(f"the {name} reward got {len(answer)} reference answers for {n} completions")
    return list(answer)


def gsm8k_accuracy_reward(completions: Sequence[Any], answer: Sequence[Any] | None = None,
                          **kwargs: Any) -> list[float]:
    """1.0 when the completion's GSM8K answer (see ``gsm8k_answer``) equals the reference in the
    ``answer`` column, else 0.0."""
    refs = _references(answer, len(completions), "gsm8k accuracy")
    return [float(gsm8k_correct(completion_text(c), r)) for c, r in zip(completions, refs)]


def gsm8k_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the completion states its answer on a ``#### <number>`` line, else 0.0."""
    return [float(has_gsm8k_format(completion_text(c))) for c in completions]


def boxed_accuracy_reward(completions: Sequence[Any], answer: Sequence[Any] | None = None,
                          **kwargs: Any) -> list[float]:
    """1.0 when the completion's last ``\\boxed{}`` equals the reference (``math_answers_equal``:
    math-verify when installed), else 0.0 (also when the completion has no box)."""
    refs = _references(answer, len(completions), "boxed accuracy")
    return [float(math_answers_equal(extract_boxed(completion_text(c)), boxed_reference(str(r))))
            for c, r in zip(completions, refs)]


def boxed_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the completion has a complete, non-empty ``\\boxed{...}``, else 0.0."""
    return [float(bool((extract_boxed(completion_text(c)) or "").strip())) for c in completions]


BUILTIN_REWARDS: dict[tuple[str, str], RewardFunc] = {
    ("accuracy", "gsm8k"): gsm8k_accuracy_reward,
    ("format", "gsm8k"): gsm8k_format_reward,
    ("accuracy", "boxed"): boxed_accuracy_reward,
    ("format", "boxed"): boxed_format_reward,
}
BUILTIN_NAMES = ("accuracy", "format")


def load_reward(spec: str) -> RewardFunc:
    """Import a reward function from ``"package.module:function"`` (or ``"package.module.function"``,
    or ``"path/to/file.py:function"``; ``function`` may be a dotted attribute path). The working
    directory is importable, as with ``python -m``. Raises RewardError (one line) when the module,
    the attribute or a callable is missing."""
    spec = spec.strip()
    if ":" in spec:
        module_name, _, attr = spec.rpartition(":")
        splits = [(module_name, attr)]
    else:  # "a.b.c.f": the longest importable module prefix, the rest is the attribute path
        parts = spec.split(".")
        splits = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    if not splits or not all(splits[0]):
        raise RewardError(f"--reward {spec!r}: expected a built-in name ({', '.join(BUILTIN_NAMES)}) or "
                          f"'module:function', e.g. mypkg.rewards:my_reward")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    module, first_error = None, None
    for module_name, attr in splits:
        try:
            module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
            break
        except RewardError:
            raise
        except ModuleNotFoundError as e:
            first_error = first_error or (module_name, e)
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            break  # the module exists but imports something missing
        except Exception as e:  # whatever the module raised while importing
            first_error = first_error or (module_name, e)
            break
    if module is None:
        name, e = first_error
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RewardError(f"--reward {spec!r}: cannot import {name!r} ({type(e).__name__}: {reason})")
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"--reward {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"--reward {spec!r}: {attr!r} in {module_name!r} is a {type(obj).__name__}, "
                          f"not a function")
    return obj


def _import_file(path: str):
    file = Path(path).expanduser()
    if not file.is_file():
        raise RewardError(f"--reward: file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"lopt_reward_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise RewardError(f"--reward: cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve_rewards(specs: Sequence[str], answer_format: str) -> list[RewardFunc]:
    """Reward functions for ``specs``: ``accuracy`` and ``format`` are the built-ins for the task's
    answer format (``gsm8k`` or ``boxed``); anything else is imported with ``load_reward``."""
    if answer_format not in ANSWER_FORMATS:
        raise RewardError(f"unknown answer format {answer_format!r}: choose one of {', '.join(ANSWER_FORMATS)}")
    if not specs:
        raise RewardError("no reward given; use --reward accuracy, --reward format or --reward module:function")
    return [BUILTIN_REWARDS[(s, answer_format)] if s in BUILTIN_NAMES else load_reward(s) for s in specs]


__all__ = ["RewardError", "ANSWER_FORMATS", "completion_text", "gsm8k_answer", "numbers_equal",
           "gsm8k_correct", "has_gsm8k_format", "extract_boxed", "normalize_math_answer", "math_value",
           "math_answers_equal", "normalized_answers_equal", "math_verify_equal", "math_verify_available",
           "clean_for_math_verify", "boxed_checker", "MATH_VERIFY_INSTALL", "boxed_reference", "gsm8k_accuracy_reward", "gsm8k_format_reward",
           "boxed_accuracy_reward", "boxed_format_reward", "BUILTIN_REWARDS", "load_reward",
           "resolve_rewards"]
