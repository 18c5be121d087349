"""The FinLoRA benchmark tasks: one frozen registry entry per task, and loading its test rows.

Each entry says where the rows come from (``<test dir>/<name>.jsonl``, or a Hugging Face dataset when the
file is absent and the hub is reachable), the closed label set if the answer is one of a few labels, the
generation budget, and the scoring rule. Budgets and task names follow FinLoRA HEAD ``test/test_dataset.py``
(``max_new_token_dict``, ``dataset_path``); see ``shared/data/MANIFEST.md`` for which local copies exist and
their quirks (TFNS labels corrected, NWGI 7-level, FiNER/FNXL batched, Headline and formula construction
missing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from finlora.common.config import ConfigError
from finlora.common.data import DataError, Row, _validated_row, default_data_dir, read_jsonl
from finlora.common.logs import get_logger

log = get_logger(__name__)

SENTIMENT = ("negative", "neutral", "positive")
NWGI_LEVELS = ("strong negative", "moderately negative", "mildly negative", "neutral", "mildly positive",
               "moderately positive", "strong positive")

METRICS = ("label", "batched_label", "exact", "numeric", "formula", "text")
"""Scoring rules: ``label`` FinLoRA's label match; ``batched_label`` the same per comma-separated question;
``exact`` / ``numeric`` / ``formula`` normalised, tolerant or by-value matches; ``text`` BERTScore (or the
offline token-F1 fallback)."""


class EvalError(ConfigError):
    """Bad evaluation input (unknown task, missing adapter, unreadable data); the CLI exits with code 2."""


@dataclass(frozen=True)
class EvalTask:
    """One benchmark task.

    Attributes
    ----------
    name : str
        finlora's task name; the local file is ``<test dir>/<name>.jsonl``.
    title : str
        Name in tables and plots.
    category : str
        ``general``, ``xbrl_reporting``, ``xbrl_analysis`` or ``knowledge`` (FinLoRA's grouping).
    hf_id : str
        Hugging Face dataset used when the local file is absent and the hub is reachable ("" = none).
    labels : tuple[str, ...] | None
        Closed label set (lowercase), or ``None`` when the answer is open (fast mode then generates).
    max_new_tokens : int
        Generation budget (FinLoRA's ``max_new_token_dict``).
    metric : str
        One of :data:`METRICS`.
    finlora_name : str
        The task's key in FinLoRA's ``dataset_path`` (for cross-reference).
    three_class : bool
        Also report the 7-level NWGI scores collapsed to negative/neutral/positive.
    """

    name: str
    title: str
    category: str
    hf_id: str
    labels: tuple[str, ...] | None
    max_new_tokens: int
    metric: str
    finlora_name: str
    three_class: bool = False

    @property
    def closed(self) -> bool:
        """True when fast mode can rank the labels instead of generating."""
        return self.labels is not None and self.metric == "label"

    @property
    def file(self) -> str:
        return f"{self.name}.jsonl"


def _task(name: str, title: str, category: str, hf_id: str, labels: tuple[str, ...] | None, max_new: int,
          metric: str, finlora_name: str, three_class: bool = False) -> tuple[str, EvalTask]:
    assert metric in METRICS, metric
    return name, EvalTask(name, title, category, hf_id, labels, max_new, metric, finlora_name, three_class)


TASKS: dict[str, EvalTask] = dict([
    # General financial tasks
    _task("fpb", "FPB", "general", "TheFinAI/en-fpb", SENTIMENT, 10, "label", "fpb"),
    _task("fiqa", "FiQA SA", "general", "TheFinAI/fiqa-sentiment-classification", SENTIMENT, 10, "label", "fiqa"),
    _task("tfns", "TFNS", "general", "zeroshot/twitter-financial-news-sentiment", SENTIMENT, 10, "label", "tfns"),
    _task("nwgi", "NWGI", "general", "TheFinAI/NWGI_test", NWGI_LEVELS, 10, "label", "nwgi", three_class=True),
    _task("headline", "Headline", "general", "FinGPT/fingpt-headline-cls", ("yes", "no"), 10, "label", "headline"),
    _task("ner", "NER", "general", "FinGPT/fingpt-ner-cls", ("location", "organization", "person"), 10, "label",
          "ner"),
    # XBRL reporting
    _task("finer", "FiNER-139", "xbrl_reporting", "FinGPT/fingpt-finer", None, 100, "batched_label", "xbrl_finer"),
    _task("fnxl", "FNXL", "xbrl_reporting", "", None, 100, "batched_label", "xbrl_fnxl"),
    # XBRL analysis
    _task("formula", "Financial Math", "xbrl_analysis", "wangd12/XBRL_analysis", None, 50, "numeric", "formula"),
    _task("xbrl_tags", "XBRL Tag Extraction", "xbrl_analysis", "wangd12/XBRL_analysis", None, 20, "exact",
          "xbrl_tags_extract"),
    _task("xbrl_value", "XBRL Value Extraction", "xbrl_analysis", "wangd12/XBRL_analysis", None, 20, "numeric",
          "xbrl_value_extract"),
    _task("xbrl_formula", "XBRL Formula Construction", "xbrl_analysis", "wangd12/XBRL_analysis", None, 30,
          "formula", "xbrl_formula_extract"),
    _task("xbrl_formula_calc", "XBRL Formula Calculation", "xbrl_analysis", "wangd12/XBRL_analysis", None, 30,
          "formula", "xbrl_formula_calc_extract"),
    # Knowledge / long-document QA
    _task("xbrl_term", "XBRL Term", "knowledge", "wangd12/XBRL_analysis", None, 50, "text", "xbrl_term"),
    _task("financebench", "FinanceBench", "knowledge", "PatronusAI/financebench", None, 50, "text", "financebench"),
])
"""Every FinLoRA benchmark task, in the order of FinLoRA's tables."""


def resolve_task_names(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` or comma-separated names -> registry names in order; an unknown name is an :class:`EvalError`."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise EvalError("no evaluation task given (use a comma-separated list or 'all')")
    if names == ["all"]:
        return list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise EvalError(f"unknown evaluation task(s): {', '.join(unknown)}; known tasks: {', '.join(TASKS)} "
                        f"(or 'all')")
    return list(dict.fromkeys(names))


def resolve_test_dir(configured: str | Path | None = None) -> Path:
    """The directory of ``<task>.jsonl`` test files: the configured one, else ``default_data_dir()/test``."""
    if configured:
        return Path(configured).expanduser()
    return default_data_dir() / "test"


SAMPLE_SEED = 0
"""Seed of the ``max_samples`` subsample: the same rows on every run, for every model."""
MAX_STRATA = 50
"""A task with at most this many distinct targets is a classification task: its subsample keeps the label mix."""


def sample_rows(rows: list[Row], max_samples: int, seed: int = SAMPLE_SEED) -> tuple[list[Row], str]:
    """(at most ``max_samples`` rows in file order, how they were drawn).

    FinLoRA test files are grouped by label, so the first N rows of a file can hold a single label (tfns: no
    "neutral" in its first 32 rows, 65 % of the file). For a classification task (few distinct targets) the
    sample is seeded and stratified by label, proportional to each label's share with at least one row per label
    where N allows; otherwise a seeded uniform sample. Deterministic, unlike FinLoRA's ``sample_ratio``.
    """
    if max_samples <= 0 or len(rows) <= max_samples:
        return rows, ""
    import random

    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row["target"].strip().lower(), []).append(i)
    if len(by_label) > MAX_STRATA:
        chosen = rng.sample(range(len(rows)), max_samples)
        how = f"seeded uniform sample of {max_samples} of {len(rows)} rows (seed {seed})"
    else:
        labels = sorted(by_label, key=lambda k: (-len(by_label[k]), k))
        shares = {k: max_samples * len(by_label[k]) / len(rows) for k in labels}
        quota = {k: int(shares[k]) for k in labels}
        for k in sorted(labels, key=lambda k: -(shares[k] - int(shares[k]))):  # largest remainders first
            if sum(quota.values()) >= max_samples:
                break
            quota[k] += 1
        for k in labels:  # every label present where N allows, taken from the largest
            if quota[k] == 0 and max_samples >= len(labels):
                donor = max(labels, key=lambda d: quota[d])
                quota[donor] -= 1
                quota[k] = 1
        chosen = [i for k in labels for i in rng.sample(by_label[k], quota[k])]
        how = (f"seeded label-stratified sample of {len(chosen)} of {len(rows)} rows (seed {seed}, "
               f"{len(labels)} labels)")
    return [rows[i] for i in sorted(chosen)], how


def load_task_rows(task: EvalTask, test_dir: Path, max_samples: int = 0,
                   allow_hub: bool | None = None) -> tuple[list[Row], str]:
    """(rows, source) for ``task``; ``([], reason)`` when it has no data here.

    ``max_samples`` draws a seeded, label-stratified sample (:func:`sample_rows`), named in ``source``. A
    malformed local file is an error, never silently "no data".
    """
    local = Path(test_dir) / task.file
    if local.is_file():
        try:
            rows = read_jsonl(local)
        except DataError as exc:
            raise EvalError(f"task '{task.name}': {exc}") from exc
        source = str(local)
    else:
        if allow_hub is None:
            allow_hub = os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True")
        if not (allow_hub and task.hf_id):
            return [], f"no data ({local} not found{'' if task.hf_id else '; no hub copy'})"
        try:
            rows = _rows_from_hub(task.hf_id)
        except Exception as exc:  # offline, gated, renamed or another column layout: report, do not crash
            log.warning("task %s: %s not found and hub dataset %s unusable: %s", task.name, local, task.hf_id, exc)
            return [], f"no data ({local} not found; hub {task.hf_id}: {exc.__class__.__name__})"
        source = f"hf:{task.hf_id}"
    rows, how = sample_rows(rows, max_samples)
    return rows, f"{source}; {how}" if how else source


def _rows_from_hub(dataset_id: str) -> list[Row]:
    """Test rows of a hub dataset with FinLoRA (context/target), FinGPT (instruction/input/output) or FLARE
    (query/answer) columns."""
    import datasets

    ds = datasets.load_dataset(dataset_id, split="test")
    rows = []
    for i, ex in enumerate(ds):
        if "context" in ex and "target" in ex:
            obj = {"context": ex["context"], "target": str(ex["target"])}
        elif {"instruction", "input", "output"} <= set(ex):
            obj = {"context": f"Instruction: {ex['instruction']}\nInput: {ex['input']}\nAnswer: ",
                   "target": str(ex["output"])}
        elif {"query", "answer"} <= set(ex):
            obj = {"context": ex["query"], "target": str(ex["answer"])}
        else:
            raise DataError(f"{dataset_id}[{i}]: unknown columns {sorted(ex)}")
        rows.append(_validated_row(obj, f"{dataset_id}[{i}]"))
    return rows
