"""Rule-based rewards for math completions: boxed-answer accuracy (via math-verify) and a format reward.

Scheme
------
accuracy_reward(completion, answer) is 1.0 when the completion's final answer equals the gold answer, else 0.0:

1. Only the text after the last ``</think>`` counts (an answer boxed inside the reasoning, or in a block reopened
   after it, earns nothing).
2. The final answer is the content of the *last* ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` there
   (extract_boxed). No box, no reward: there is no fallback to "the last number in the text", which a policy
   learns to exploit.
3. Gold and prediction go through the same light normalisation (``\\text{}``, ``\\left``, ``\\dfrac``, ``^\\circ``,
   ``\\%``, ``\\$``, thousands separators, ...) and are then parsed by math-verify *wrapped* in ``\\boxed{}``
   (a bare ``3\\sqrt{2}`` parses as 3). Normalised strings that are identical count as equal without sympy;
   otherwise math-verify's ``verify`` decides (numeric, symbolic, set/interval/tuple/relation equality).
   A gold answer math-verify cannot parse at all is warned about once per distinct gold; it can still be
   matched by the normalised string comparison.

Bounded work
------------
The reward never raises and never hangs on model output; every call returns within a few seconds:

- the last box is searched for only in the final _TAIL_CHARS characters; answers longer than _MAX_ANSWER_CHARS,
  with brackets nested deeper than _MAX_NESTING, or parsing to a sympy tree deeper than _MAX_DEPTH or larger than
  _MAX_NODES score 0 (sympy's evaluation is exponential in the depth of some trees);
- numbers too large to evaluate (``10^{10^{10}}``, ``(10^{10})!``) are rejected by a magnitude bound on the parsed,
  still unevaluated, expression before any comparison (_too_big): big-integer arithmetic runs in C, which no
  timeout below can interrupt;
- in the main thread, math-verify's own timeouts (signal.alarm) stop a parse after _PARSE_TIMEOUT_S and a
  comparison after _VERIFY_TIMEOUT_S seconds. The trainer calls the reward in the main thread of every DDP rank
  (each rank is its own process), so this is the normal path;
- signal.alarm raises ValueError in any other thread, so there math-verify's timeouts are switched off and
  call_with_deadline bounds the whole call to _THREAD_DEADLINE_S instead: a sys.setprofile hook raises
  math-verify's TimeoutException at the first function call past the deadline. The hook costs ~2-3x in speed, on this
  path only.
"""

import functools
import logging
import math
import re
import sys
import threading
import time

import sympy
from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

logger = logging.getLogger(__name__)

_TAIL_CHARS = 100_000  # the final answer sits at the end; don't scan megabytes of text
_MAX_ANSWER_CHARS = 1_000  # longest MATH/DeepScaleR gold answers are ~160 characters
_MAX_NESTING = 12  # bracket nesting of the answer text; MATH/DeepScaleR golds nest at most 3 deep
_MAX_DEPTH = 40  # sympy tree depth
_MAX_NODES = 5_000
_MAX_LOG10 = 10_000.0  # reject numbers with more than ~10k digits before sympy evaluates them
_PARSE_TIMEOUT_S = 2  # math-verify's signal.alarm timeouts (main thread only) take whole seconds
_VERIFY_TIMEOUT_S = 2
_THREAD_DEADLINE_S = _PARSE_TIMEOUT_S + _VERIFY_TIMEOUT_S  # one budget per call in other threads

# Box start: \boxed or \fbox not followed by a letter (so \boxedfoo is a different command).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# "3 + 8" for 11: a sum, difference or product of plain numbers restates the question instead of answering it
# (math-verify would count it equal); a candidate arithmetic demo's model learned to copy the problem into the box.
# Fractions stay answers.
_UNEVALUATED_RE = re.compile(r"-?\d+(?:\.\d+)?(?:\s*(?:[-+*×·]|\\times|\\cdot)\s*-?\d+(?:\.\d+)?)+")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # escaped characters (\{, \}) don't count as braces


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed x``) in text, None when absent.

    Nested braces are matched; escaped braces (``\\{``) are not counted. "Last" is the box that starts last; when
    it is never closed (a truncated completion) there is no answer.
    """
    if not isinstance(text, str):
        return None
    tail = text[-_TAIL_CHARS:]
    start = None
    for m in _BOX_RE.finditer(tail):
        start = m.end()
    if start is None:
        return None
    rest = tail[start:]
    open_at = len(rest) - len(rest.lstrip())
    if not rest.startswith("{", open_at):
        if open_at == 0:  # "\boxed" followed by neither "{" nor a space: not an answer
            return None
        # \boxed 5: the argument runs to the end of the math (or line), as in Hendrycks' MATH grader.
        content = re.split(r"[$\n]|\\\]|\\\)", rest, maxsplit=1)[0].strip()
        return content or None
    depth = 0
    for m in _BRACE_RE.finditer(rest, open_at):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return rest[open_at + 1 : m.start()]
    return None


def _nesting(s: str) -> int:
    """Deepest bracket nesting in s, counting (, [ and { alike."""
    depth = deepest = 0
    for c in s:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth -= 1
    return deepest


def answer_part(completion: str) -> str:
    """The text after the last ``</think>`` up to a ``<think>`` that reopens a block; "" inside a never-closed
    ``<think>``; all of a tag-free completion."""
    i = completion.rfind("</think>")
    if i >= 0:
        return completion[i + len("</think>") :].split("<think>", 1)[0]
    return "" if "<think>" in completion else completion


# ---------------------------------------------------------------------------------------------------------------
# Normalisation shared by gold and prediction: rewrites math-verify gets wrong or that only change the notation.

_SPACING_RE = re.compile(r"(?<!\\)\\[,;: ]|~")  # thin spaces; "\\ " (a matrix row end) is not one
_LEFT_RIGHT_RE = re.compile(
    r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])|\\displaystyle|\\phantom\s*(?:\{[^{}]*\}|.)"
)
_DEGREE_RE = r"\s*(?:\^\s*\{?\\circ\}?|°|\\degree(?![a-zA-Z]))"
_DEGREE_UNIT_RE = re.compile(_DEGREE_RE)
_DEGREE_ARG_RE = re.compile(r"(\d+(?:\.\d+)?)" + _DEGREE_RE)
_TRIG_RE = re.compile(r"\\(?:sin|cos|tan|sec|csc|cot)(?![a-zA-Z])")
_TOKEN = r"(\\[a-zA-Z]+|[0-9a-zA-Z])"  # a single-token LaTeX argument
_FRAC_RE = re.compile(r"\\frac\s*(?:\{([^{}]*)\}|" + _TOKEN + r")\s*(?:\{([^{}]*)\}|" + _TOKEN + r")")
_SQRT_RE = re.compile(r"\\sqrt\s*" + _TOKEN)
_TEXT_UNIT_RE = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm|textrm)\s*\{\s*[a-zA-Z][a-zA-Z .]*\}(?:\^\{?\d\}?)?$")
_WORD_UNIT_RE = re.compile(r"^(-?[\d.,]+)\s+[a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*\.?$")  # "5 cm", "12 square feet"
_NUMBER_RE = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?"  # 1,000 or 12,345.5
_THOUSANDS_RE = re.compile(_NUMBER_RE)
_BRACED_THOUSANDS_RE = re.compile(r"\{(" + _NUMBER_RE + r")\}")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox)\s*\{([^{}]*)\}")


def _normalize(s: str) -> str:
    """Canonical LaTeX for an answer (the text math-verify parses). Changes notation only, never the value."""
    s = s.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$")
    s = _SPACING_RE.sub(" ", s).replace("\\!", "")  # \! also appears in 29,\!322
    s = _LEFT_RIGHT_RE.sub("", s)
    if _TRIG_RE.search(s):  # \cos 6^\circ is \cos(pi/30), not cos(6 radians)
        s = _DEGREE_ARG_RE.sub(r"(\\frac{\1\\pi}{180})", s)
    s = _DEGREE_UNIT_RE.sub("", s)  # 30^\circ is the number 30
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = _FRAC_RE.sub(lambda m: f"\\frac{{{m[1] or m[2]}}}{{{m[3] or m[4]}}}", s)  # \frac12, \frac\pi 2, \dfrac
    s = _SQRT_RE.sub(r"\\sqrt{\1}", s)
    s = re.sub(r"^\\approx\s*", "", s.strip())
    s = s.strip().rstrip(".,;").strip()
    s = _TEXT_UNIT_RE.sub("", s).strip() or s  # 5\text{ cm}^2 -> 5; a bare \text{Evelyn} stays
    s = _WORD_UNIT_RE.sub(r"\1", s)
    s = _BRACED_THOUSANDS_RE.sub(lambda m: "{" + m[1].replace(",", "") + "}", s)  # \frac{1}{29,322}
    if _THOUSANDS_RE.fullmatch(s):  # only a lone number: (1,100) is a point, not 1100
        s = s.replace(",", "")
    return re.sub(r"\s+", " ", s)


def _key(norm: str) -> str:
    """String-comparison key: equal keys mean the same answer, so no sympy is needed."""
    return re.sub(r"\s+", "", _TEXT_CMD_RE.sub(r"\1", norm))


def _as_text(x) -> str | None:
    """A gold answer as text: floats that are integers lose their ``.0`` (142.0 -> "142")."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, float):
        if not math.isfinite(x):
            return None
        return str(int(x)) if x.is_integer() else repr(x)
    if isinstance(x, int):
        return str(x)
    if not isinstance(x, str):
        return None
    s = x.strip()
    if re.fullmatch(r"-?\d+\.0+", s):  # "142.0": a number stored as a float
        s = s.split(".")[0]
    if "\\boxed" in s or "\\fbox" in s:
        s = extract_boxed(s) or s
    return s


# ---------------------------------------------------------------------------------------------------------------
# Parsing and comparison.

# math-verify's unit stripping deletes trailing single letters ("a + b + c" -> "a + b +"); _normalize strips units.
_LATEX_CFG = [
    LatexExtractionConfig(
        boxed_match_priority=0,
        try_extract_without_anchor=False,
        normalization_config=NormalizationConfig(
            basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
        ),
    )
]


_INT_RE = re.compile(r"-?\d{1,50}")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _parse(s: str):
    """math-verify's sympy object for normalised LaTeX s, or None."""
    if _INT_RE.fullmatch(s):  # the commonest answer; the same Integer math-verify builds, without ANTLR
        return sympy.Integer(s)
    timeout = _PARSE_TIMEOUT_S if _in_main_thread() else None
    try:
        parsed = parse("\\boxed{" + s + "}", extraction_config=_LATEX_CFG, parsing_timeout=timeout)
    except (Exception, TimeoutException):
        return None
    expr = next((p for p in parsed if not isinstance(p, str)), None)
    if expr is None or _too_big(expr):
        return None
    return expr


def _log10_int(n: int) -> float:
    return math.log10(n) if n.bit_length() < 1000 else n.bit_length() * 0.30103


def _log10_bound(e, depth: int, budget: list[int]) -> float:
    """Upper bound on log10(1 + |v|) for the numbers v that evaluating e can create (a symbol counts as 10).

    Computed on the unevaluated tree, so it is cheap even for 10^{10^{10}}; inf when too deep or too large.
    """
    budget[0] -= 1
    if depth > _MAX_DEPTH or budget[0] < 0:
        return math.inf
    if isinstance(e, sympy.Rational):  # Integer too
        return _log10_int(abs(e.p) + 1) + _log10_int(e.q)
    if isinstance(e, sympy.Float):
        return math.log10(1 + abs(float(e))) if math.isfinite(float(e)) else math.inf
    if isinstance(e, sympy.Symbol | sympy.NumberSymbol):
        return 1.0
    args = e.args if isinstance(e, sympy.Basic) else ()
    bounds = [_log10_bound(a, depth + 1, budget) for a in args if isinstance(a, sympy.Basic)]
    if isinstance(e, sympy.Pow | sympy.exp):
        if bounds[-1] > 300:
            return math.inf
        # log10|b^x| <= |x| log10|b|; |x| <= 10^L(x) - 1; |x| <= 1 (sqrt, 1/b) adds no digits
        base = bounds[0] if isinstance(e, sympy.Pow) else 1.0
        return max(base, 1.0) * max(1.0, 10.0 ** bounds[-1] - 1)
    if isinstance(e, sympy.Sum | sympy.Product):  # bounds[1:] are the limits (i, lo, hi)
        n = max(bounds[1:], default=0.0)
        return math.inf if n > 4 else 10.0**n * max(bounds)
    if isinstance(e, sympy.factorial | sympy.factorial2 | sympy.subfactorial | sympy.gamma | sympy.binomial):
        n = max(bounds)
        return math.inf if n > 300 else 10.0**n * max(n, 1.0)  # log10(n!) <= n log10(n)
    return sum(bounds)


def _too_big(expr) -> bool:
    try:
        return _log10_bound(expr, 0, [_MAX_NODES]) > _MAX_LOG10
    except Exception:
        return True


_warned_golds: set[str] = set()


def _warn_gold(answer, consequence: str = "every completion scores 0") -> None:
    """Log a gold answer that math-verify cannot use, once per distinct answer (a dataset problem, not noise)."""
    key = repr(answer)
    if key not in _warned_golds:
        _warned_golds.add(key)
        logger.warning("math-verify cannot parse gold answer %s: %s", key, consequence)


@functools.lru_cache(maxsize=4096)
def _gold_norm(answer: str) -> str:
    return _normalize(answer)


@functools.lru_cache(maxsize=4096)
def _gold_expr(answer: str):
    """math-verify's sympy object for a gold answer, or None; warns once per distinct gold it cannot parse."""
    expr = _parse(_gold_norm(answer))
    if expr is None:
        _warn_gold(answer, "only an identical answer string can match it")
    return expr


def _accuracy(completion: str, answer) -> float:
    gold = _as_text(answer)
    if not gold:
        _warn_gold(answer)
        return 0.0
    if not isinstance(completion, str):
        return 0.0
    pred = extract_boxed(answer_part(completion))
    if pred is None or len(pred) > _MAX_ANSWER_CHARS or _nesting(pred) > _MAX_NESTING:
        return 0.0
    pred_norm = _normalize(pred)
    if not pred_norm:
        return 0.0
    if _key(pred_norm) == _key(_gold_norm(gold)):
        return 1.0
    if _UNEVALUATED_RE.fullmatch(pred.strip()) or _UNEVALUATED_RE.fullmatch(pred_norm.strip()):
        return 0.0
    gold_expr = _gold_expr(gold)
    if gold_expr is None:
        return 0.0
    pred_expr = _parse(pred_norm)
    if pred_expr is None:
        return 0.0
    timeout = _VERIFY_TIMEOUT_S if _in_main_thread() else None
    return 1.0 if verify(gold_expr, pred_expr, timeout_seconds=timeout) else 0.0


def call_with_deadline(seconds: float, error: BaseException, fn, *args, **kwargs):
    """fn(*args, **kwargs), with `error` raised at its first function call (Python or C) once `seconds` have passed:
    the timeout for threads without signal.alarm (accuracy_reward's here, scoring.py's for plug-in rewards).

    A profile hook does it. Like a signal, it cannot stop C code mid-call (_too_big rules out the big-int arithmetic
    that could run that long here). A profiler already running in this thread is left alone (no deadline)."""
    if sys.getprofile() is not None:
        return fn(*args, **kwargs)
    deadline = time.monotonic() + seconds

    def check(frame, event, arg):
        if event in ("call", "c_call") and time.monotonic() > deadline:
            raise error  # Python then removes this hook

    sys.setprofile(check)
    try:
        return fn(*args, **kwargs)
    finally:
        sys.setprofile(None)


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 when the last boxed answer after ``</think>`` equals the gold answer (math-verify), else 0.0."""
    try:
        if _in_main_thread():
            return _accuracy(completion, answer)
        timeout = TimeoutException("accuracy_reward ran out of time")  # math-verify and accuracy_reward catch it
        return call_with_deadline(_THREAD_DEADLINE_S, timeout, _accuracy, completion, answer)
    except (Exception, TimeoutException):  # math-verify's TimeoutException is a BaseException
        return 0.0


def format_reward(completion: str) -> float:
    """1.0 for ``[<think>] ... </think> ... \\boxed{x}`` or a think-free completion with a box, else 0.0.

    At most one ``<think>`` and one ``</think>``, the open (if present) before the close, and a box after the
    close. Qwen3's thinking template already ends the prompt with ``<think>\\n``, so a completion that only closes
    the block is well-formed.
    """
    if not isinstance(completion, str):
        return 0.0
    n_open, n_close = completion.count("<think>"), completion.count("</think>")
    if n_open > 1 or n_close > 1 or (n_open == 1 and n_close == 0):
        return 0.0
    if n_open == 1 and completion.find("<think>") > completion.find("</think>"):
        return 0.0
    return 1.0 if (extract_boxed(answer_part(completion)) or "").strip() else 0.0


def score(completions: list[str], answers: list[str], format_weight: float = 0.0) -> tuple[list[float], list[float]]:
    """(reward, accuracy) per completion, reward = accuracy + format_weight * format_reward."""
    if len(completions) != len(answers):
        raise ValueError(f"score: {len(completions)} completions but {len(answers)} answers")
    accuracy = [accuracy_reward(c, a) for c, a in zip(completions, answers, strict=True)]
    if format_weight == 0.0:
        return list(accuracy), accuracy
    reward = [acc + format_weight * format_reward(c) for acc, c in zip(accuracy, completions, strict=True)]
    return reward, accuracy


def rewards(completions: list[str], answers: list[str], format_weight: float = 0.0) -> list[float]:
    """The batch entry point of the trainer: one scalar reward per completion."""
    return score(completions, answers, format_weight)[0]
