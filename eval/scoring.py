"""Pure scoring of model answers: FinLoRA's label matching, batched FiNER/FNXL alignment, exact and numeric match.

No torch and no I/O here, so every rule can be tested on hand-made strings. The FinLoRA-compatible rules
follow FinLoRA's own evaluation code (Open-Finance-Lab/FinLoRA, ``test/test_dataset.py`` and
``test/inference.py`` at HEAD; the per-task scripts ``test/general_fin/{fpb,nwgi}.py`` for the 3-class
collapse):

* the answer is the decoded text after the last ``"Answer:"`` (``inference.py``: ``o.split(delimiter)[-1]``
  with ``delimiter="Answer:"``), stripped;
* ``evaluate_accuracy``: lowercase the answer, find every label of the label set in it, take the label that
  occurs *earliest*; the row is correct when that label equals the lowercased target; the "response" kept for
  F1 is the target when correct, else the raw answer;
* F1 is scikit-learn's ``f1_score(targets, responses, average="weighted")``;
* ``process_batched``: FiNER/FNXL answers and targets are split on commas, stripped, newlines removed, and the
  answer list is truncated or padded with ``""`` to the target's length, then scored per question.

Where FinLoRA is ambiguous we pick a deterministic rule and say so: FinLoRA sorts found labels by position
only, so two labels starting at the same index (``"interestexpense"`` / ``"interestexpensedebt"``) are ordered
by Python ``set`` iteration, which changes with hash randomisation; we prefer the longer label. FinLoRA's
label set is ``list(set(targets))`` of the rows scored; for the closed tasks we use the registry's label set,
which is the same set on the full test files (every label occurs) and stays fixed when ``max_samples`` keeps
only a few rows. FiNER/FNXL and the extraction tasks use the distinct targets, as FinLoRA does.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

ANSWER_DELIMITER = "Answer:"


@dataclass(frozen=True)
class Score:
    """Scores of one task over its rows; ``responses`` are what F1 was computed on.

    Attributes
    ----------
    accuracy, f1 : float | None
        Fractions in [0, 1]; ``None`` when the metric does not apply (``f1`` carries BERTScore or its
        fallback for the open-text tasks, where ``accuracy`` is ``None``).
    correct : list[bool]
        Per scored unit (a row, or a question of a batched FiNER/FNXL row).
    labels : list[str]
        The mapped label of each unit (``""`` when no label was found).
    extra : dict[str, float]
        Further task metrics (NWGI 3-class, FinLoRA's substring accuracy for extraction tasks, ROUGE-L).
    """

    accuracy: float | None
    f1: float | None
    correct: list[bool]
    labels: list[str]
    extra: dict[str, float] = field(default_factory=dict)


def finlora_answer(decoded: str, delimiter: str = ANSWER_DELIMITER) -> str:
    """FinLoRA's answer extraction: the text after the last ``delimiter``, stripped."""
    return decoded.split(delimiter)[-1].strip()


def first_label(output: str, labels: Sequence[str]) -> str:
    """The label (lowercased) that occurs earliest in the lowercased ``output``; ``""`` if none occurs.

    FinLoRA ``evaluate_accuracy``; ties at one position go to the longer label (see the module docstring).
    """
    text = output.lower()
    best: tuple[int, int] | None = None
    found = ""
    for label in dict.fromkeys(str(x).lower() for x in labels):
        if not label:
            continue
        index = text.find(label)
        if index != -1 and (best is None or (index, -len(label)) < best):
            best, found = (index, -len(label)), label
    return found


def weighted_f1(targets: Sequence[str], predictions: Sequence[str]) -> float:
    """scikit-learn's support-weighted F1 (FinLoRA's and BloombergGPT's F1)."""
    from sklearn.metrics import f1_score

    if not targets:
        return float("nan")
    return float(f1_score(list(targets), list(predictions), average="weighted", zero_division=0))


def finlora_label_score(outputs: Sequence[str], targets: Sequence[str], labels: Sequence[str]) -> Score:
    """FinLoRA's accuracy and weighted F1: earliest label in the output must equal the target."""
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs for {len(targets)} targets")
    mapped = [first_label(x, labels) for x in outputs]
    correct = [m != "" and m == str(y).lower() for m, y in zip(mapped, targets)]
    responses = [y if ok else x for x, y, ok in zip(outputs, targets, correct)]
    accuracy = sum(correct) / len(correct) if correct else float("nan")
    return Score(accuracy, weighted_f1(targets, responses), correct, mapped)


def split_batched(outputs: Sequence[str], targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """FinLoRA ``process_batched``: one (answer, target) pair per question of a batched FiNER/FNXL prompt."""
    flat_out: list[str] = []
    flat_target: list[str] = []
    for output, target in zip(outputs, targets):
        answers = [x.strip().replace("\n", "") for x in output.split(",")]
        wanted = [x.strip().replace("\n", "") for x in target.split(",")]
        flat_target += wanted
        flat_out += (answers + [""] * len(wanted))[: len(wanted)]
    return flat_out, flat_target


def batched_label_score(outputs: Sequence[str], targets: Sequence[str]) -> Score:
    """FiNER/FNXL: align answers per question, then FinLoRA's label rule over the distinct targets."""
    flat_out, flat_target = split_batched(outputs, targets)
    return finlora_label_score(flat_out, flat_target, sorted(set(flat_target)))


def sentiment_polarity(text: str) -> str:
    """FinLoRA ``change_target`` (``general_fin/nwgi.py``): collapse NWGI's 7 levels to 3 by substring."""
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"


def three_class_score(outputs: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """NWGI collapsed to negative/neutral/positive: accuracy and weighted F1.

    FinLoRA's ``nwgi.py`` calls ``f1_score(predictions, targets)`` (arguments swapped, so classes are weighted
    by how often they are *predicted*); here the true labels come first, as scikit-learn intends.
    """
    pred = [sentiment_polarity(x) for x in outputs]
    true = [sentiment_polarity(y) for y in targets]
    acc = sum(p == t for p, t in zip(pred, true)) / len(true) if true else float("nan")
    return {"accuracy_3class": acc, "f1_3class": weighted_f1(true, pred)}


# --- extraction and math -------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def normalize_answer(text: str) -> str:
    """Lowercase, first line only, surrounding quotes/periods dropped, whitespace collapsed."""
    line = text.strip().split("\n", 1)[0] if text.strip() else ""
    line = line.strip().strip("\"'`").rstrip(".").strip()
    return " ".join(line.lower().split())


def parse_number(text: str) -> float | None:
    """The first number in ``text`` with thousands separators, ``$`` and ``%`` ignored; ``None`` if none."""
    cleaned = re.sub(r"(?<=\d),(?=\d{3})", "", text).replace("$", "")
    match = _NUMBER.search(cleaned)
    return float(match.group()) if match else None


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def eval_arithmetic(text: str) -> float | None:
    """Value of a plain arithmetic expression (numbers, + - * / ** and parentheses), else ``None``.

    Formula-calculation answers such as ``(6226000000 / 38542000000) * 100`` are compared by value, so a
    correct formula written with other spacing or an equivalent bracket layout still counts.
    """
    expr = re.sub(r"(?<=\d),(?=\d{3})", "", normalize_answer(text)).replace("$", "").replace("^", "**")
    if not expr or len(expr) > 300:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        return float(_eval_node(tree.body))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, KeyError):
        return None


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp):
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        return _OPS[type(node.op)](_eval_node(node.operand))
    raise ValueError(f"not arithmetic: {type(node).__name__}")


def numbers_close(a: float, b: float, rel_tol: float = 1e-6, abs_tol: float = 0.01) -> bool:
    """Equal up to rounding: 2-decimal answers (``abs_tol``) or large values written slightly off (``rel_tol``)."""
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def exact_match(output: str, target: str) -> bool:
    """Exact match after :func:`normalize_answer` (XBRL tags, formula construction)."""
    return normalize_answer(output) == normalize_answer(target) != ""


def numeric_match(output: str, target: str) -> bool:
    """Exact match, or the first number of the answer within tolerance of a numeric target (values, math)."""
    if exact_match(output, target):
        return True
    want = parse_number(target) if _NUMBER.fullmatch(re.sub(r"[,$%\s]", "", target)) else None
    got = parse_number(normalize_answer(output))
    return want is not None and got is not None and numbers_close(got, want)


def formula_match(output: str, target: str) -> bool:
    """Same formula text (spaces ignored), or both are arithmetic expressions with the same value."""
    if normalize_answer(output).replace(" ", "") == normalize_answer(target).replace(" ", "") != "":
        return True
    want, got = eval_arithmetic(target), eval_arithmetic(output)
    return want is not None and got is not None and numbers_close(got, want)


MATCHERS = {"exact": exact_match, "numeric": numeric_match, "formula": formula_match}
"""Open-answer rules by registry name."""


def match_score(outputs: Sequence[str], targets: Sequence[str], rule: str) -> Score:
    """Accuracy under ``rule``, F1 as FinLoRA computes it, and FinLoRA's own substring accuracy as extra.

    FinLoRA scores extraction tasks with its label rule over the set of all targets, which credits any
    answer that merely *contains* the right value first; ``accuracy_finlora`` keeps that number comparable
    with FinLoRA's tables while ``accuracy`` is the stricter normalised/numeric match.
    """
    matcher = MATCHERS[rule]
    correct = [matcher(x, y) for x, y in zip(outputs, targets)]
    responses = [y if ok else x for x, y, ok in zip(outputs, targets, correct)]
    accuracy = sum(correct) / len(correct) if correct else float("nan")
    finlora = finlora_label_score(outputs, targets, sorted(set(targets)))
    labels = [normalize_answer(x) for x in outputs]
    return Score(accuracy, weighted_f1(targets, responses), correct, labels,
                 {"accuracy_finlora": finlora.accuracy, "f1_finlora": finlora.f1})


# --- open text (XBRL Term, FinanceBench) ---------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)


def _tokens(text: str) -> list[str]:
    """SQuAD normalisation: lowercase, punctuation and articles removed, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return [t for t in text.split() if t not in ("a", "an", "the")]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token-overlap F1 between two texts (1.0 when both are empty)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for j, r in enumerate(ref, start=1):
            cur.append(prev[j - 1] + 1 if p == r else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def text_similarity_score(outputs: Sequence[str], targets: Sequence[str],
                          bertscore_f1: Sequence[float] | None = None) -> Score:
    """Open-text tasks: mean BERTScore F1 when given, else mean token F1 (the offline fallback).

    ROUGE-L and token F1 are always reported in ``extra`` so runs with and without BERTScore can be compared.
    ``correct`` marks rows whose score reaches 0.5, only so that predictions files carry a rough verdict.
    """
    tf1 = [token_f1(x, y) for x, y in zip(outputs, targets)]
    rl = [rouge_l(x, y) for x, y in zip(outputs, targets)]
    n = len(targets)
    extra = {"token_f1": sum(tf1) / n if n else float("nan"), "rouge_l": sum(rl) / n if n else float("nan")}
    main = list(bertscore_f1) if bertscore_f1 is not None else tf1
    f1 = sum(main) / n if n else float("nan")
    return Score(None, f1, [s >= 0.5 for s in main], [x.strip() for x in outputs], extra)
