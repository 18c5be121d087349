"""Score an already-loaded (PEFT) model on FinLoRA benchmark tasks: the one entry point for the CLI and the server.

:func:`evaluate_model` takes the model in memory, so the server can score its global adapter after a round
without saving and reloading it, and ``finlora eval`` only adds model loading around it. Inference is chosen
by mode and task: ``finlora`` generates every answer as FinLoRA does and scores it with FinLoRA's rules;
``fast`` ranks the labels of closed tasks by log-likelihood and generates only where the answer is open.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finlora.common.data import Row
from finlora.common.logs import get_logger
from finlora.eval import scoring
from finlora.eval.endpoint import EndpointModel
from finlora.eval.fast import best_labels, label_logprobs, label_surface_forms
from finlora.eval.generate import first_line, generate_texts
from finlora.eval.report import clean_number, write_outputs
from finlora.eval.tasks import EvalError, EvalTask, TASKS, load_task_rows, resolve_task_names, resolve_test_dir
from finlora.eval.textscore import BERTSCORE_NAME, FALLBACK_NAME, bertscore_f1

log = get_logger(__name__)

MODES = ("finlora", "fast")
NO_DATA = "no data"


@dataclass
class TaskResult:
    """The outcome of one task.

    Attributes
    ----------
    task : str
        Registry name.
    n : int
        Rows (prompts) scored; 0 when the task had no data.
    accuracy, f1 : float | None
        Fractions in [0, 1]; ``None`` when not applicable or no data. For the open-text tasks ``f1`` is
        BERTScore F1 or, offline, the token-F1 fallback named in ``metric``.
    seconds, samples_per_s : float, float | None
        Wall time of inference plus scoring, and ``n / seconds``.
    mode : str
        ``finlora`` or ``fast`` as requested; ``inference`` says what ran (``generate`` or ``loglik``).
    status : str
        ``ok`` or ``no data``; ``detail`` says why there was no data, or where the rows came from.
    metric : str
        What ``accuracy`` / ``f1`` measure for this task.
    extra : dict[str, float | None]
        Further metrics (NWGI 3-class, FinLoRA substring accuracy, ROUGE-L, prompts cut to fit, questions).
    predictions : list[dict]
        One record per row: ``id``, ``target``, ``raw_output``, ``label``, ``correct`` (and label scores in fast
        mode); written to ``predictions/<task>.jsonl``.
    """

    task: str
    n: int
    accuracy: float | None
    f1: float | None
    seconds: float
    samples_per_s: float | None
    mode: str
    status: str
    metric: str
    inference: str = ""
    detail: str = ""
    extra: dict[str, float | None] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` entry (no predictions; NaN -> null)."""
        return {"n": self.n, "accuracy": clean_number(self.accuracy), "f1": clean_number(self.f1),
                "seconds": round(self.seconds, 3), "samples_per_s": clean_number(self.samples_per_s),
                "mode": self.mode, "status": self.status, "metric": self.metric, "inference": self.inference,
                "detail": self.detail, "title": TASKS[self.task].title if self.task in TASKS else self.task,
                "extra": {k: clean_number(v) for k, v in self.extra.items()}}


def _metric_name(task: EvalTask, text_metric: str) -> str:
    return {"label": "accuracy + weighted F1 (FinLoRA label match)",
            "batched_label": "per-question accuracy + weighted F1 (FinLoRA batched label match)",
            "exact": "normalised exact match + weighted F1",
            "numeric": "numeric match (rel 1e-6 / abs 0.01) + weighted F1",
            "formula": "formula text or value match + weighted F1",
            "text": text_metric}[task.metric]


def _infer(model: Any, tokenizer: Any, task: EvalTask, rows: Sequence[Row], mode: str, batch_size: int,
           on_batch: Callable[[int], None]) -> tuple[list[str], list[dict[str, float]] | None, str, int, int]:
    """Raw answers (and label scores in fast mode) -> (answers, scores, inference kind, batch size, cut).

    FinLoRA mode applies FinLoRA's "text after the last ``Answer:``" to the generated continuation only. For
    every prompt that ends with ``Answer:`` (all local files except FiNER/FNXL) that is exactly what FinLoRA's
    split of the whole decoded sequence gives (:mod:`eval.reference`, checked by a test). FiNER/FNXL prompts
    end with ``Output US GAAP tags:`` and contain no ``Answer:``, so FinLoRA HEAD would keep the whole prompt,
    whose comma-separated tag list would then be split into "answers"; we keep only the continuation.
    """
    prompts = [r["context"] for r in rows]
    if isinstance(model, EndpointModel):  # a served adapter: generation over HTTP, FinLoRA's protocol
        texts, size, cut = model.generate_texts(prompts, task.max_new_tokens, batch_size, on_batch=on_batch)
        return [scoring.finlora_answer(t) for t in texts], None, "generate (endpoint)", size, cut
    if mode == "fast" and task.closed:
        labels = label_surface_forms(task.labels or (), [r["target"] for r in rows])
        scores, size, cut = label_logprobs(model, tokenizer, prompts, labels, batch_size, on_batch=on_batch)
        named = [dict(zip(labels, row)) for row in scores]
        return best_labels(scores, labels), named, "loglik", size, cut
    texts, size, cut = generate_texts(model, tokenizer, prompts, task.max_new_tokens, batch_size,
                                      stop_on_newline=(mode == "fast"), on_batch=on_batch)
    answers = [scoring.finlora_answer(t) for t in texts] if mode == "finlora" else [first_line(t) for t in texts]
    return answers, None, "generate", size, cut


def score_task(task: EvalTask, answers: Sequence[str], targets: Sequence[str]) -> tuple[scoring.Score, str]:
    """Score answers by the task's rule; returns the score and the metric's name."""
    text_metric = ""
    if task.metric == "label":
        score = scoring.finlora_label_score(answers, targets, task.labels or ())
        if task.three_class:
            score.extra.update(scoring.three_class_score(answers, targets))
    elif task.metric == "batched_label":
        score = scoring.batched_label_score(answers, targets)
    elif task.metric == "text":
        bert = bertscore_f1(answers, targets)
        text_metric = BERTSCORE_NAME if bert is not None else FALLBACK_NAME
        score = scoring.text_similarity_score(answers, targets, bert)
    else:
        score = scoring.match_score(answers, targets, task.metric)
    return score, _metric_name(task, text_metric)


def _prediction_records(task: EvalTask, rows: Sequence[Row], answers: Sequence[str], score: scoring.Score,
                        label_scores: list[dict[str, float]] | None) -> list[dict[str, Any]]:
    """One record per row; a batched FiNER/FNXL row carries its questions' labels and correctness as lists."""
    records = []
    unit = 0
    for i, (row, answer) in enumerate(zip(rows, answers)):
        width = len(row["target"].split(",")) if task.metric == "batched_label" else 1
        labels, correct = score.labels[unit:unit + width], score.correct[unit:unit + width]
        unit += width
        rec: dict[str, Any] = {"id": i, "target": row["target"], "raw_output": answer,
                               "label": ",".join(labels) if width > 1 else labels[0],
                               "correct": correct if width > 1 else correct[0]}
        if label_scores is not None:
            rec["label_logprobs"] = {k: round(v, 5) for k, v in label_scores[i].items()}
        records.append(rec)
    return records


def evaluate_task(model: Any, tokenizer: Any, task: EvalTask, rows: Sequence[Row], mode: str, batch_size: int,
                  source: str = "", progress: bool = True,
                  advance: Callable[[int], Any] | None = None) -> tuple[TaskResult, int]:
    """Run and score one task on ``rows``; returns the result and the batch size that worked. ``advance`` (rows
    done) drives a caller's progress bar; without it the task shows its own."""
    from tqdm import tqdm

    start = time.perf_counter()
    targets = [r["target"] for r in rows]
    with tqdm(total=len(rows), desc=f"{task.name} ({mode})", unit="ex", disable=not progress or advance is not None,
              dynamic_ncols=True) as bar:
        answers, label_scores, kind, size, cut = _infer(model, tokenizer, task, rows, mode, batch_size,
                                                        advance or bar.update)
    score, metric = score_task(task, answers, targets)
    seconds = time.perf_counter() - start
    extra = dict(score.extra)
    if cut:
        extra["prompts_cut_to_context"] = cut
    if task.metric == "batched_label":
        extra["questions"] = len(score.correct)
    result = TaskResult(task.name, len(rows), score.accuracy, score.f1, seconds,
                        len(rows) / seconds if seconds > 0 else None, mode, "ok", metric, kind, source, extra,
                        _prediction_records(task, rows, answers, score, label_scores))
    return result, size


def _no_data(task: EvalTask, mode: str, reason: str) -> TaskResult:
    return TaskResult(task.name, 0, None, None, 0.0, None, mode, NO_DATA, _metric_name(task, "text similarity"),
                      "", reason)


def evaluate_model(model: Any, tokenizer: Any, tasks: str | Sequence[str] = "all",
                   data_dir: str | Path | None = None, max_samples: int = 0, mode: str = "fast",
                   batch_size: int = 16, out_dir: str | Path | None = None, progress: bool = True,
                   title: str = "") -> dict[str, TaskResult]:
    """Score ``model`` (a PEFT model or a plain causal LM, already loaded) on FinLoRA benchmark tasks.

    Parameters
    ----------
    model, tokenizer
        The model in memory (e.g. the server's PEFT model with the round's global adapter loaded) and its
        tokenizer. The model is put in eval mode for the run and restored afterwards.
    tasks : str | Sequence[str]
        ``"all"``, a comma-separated string or a list of registry names (:data:`eval.tasks.TASKS`).
    data_dir : str | Path | None
        Directory of ``<task>.jsonl`` test files; ``None``/``""`` = ``default_data_dir()/test``. A directory
        given explicitly must exist; tasks whose file is absent report ``status = "no data"``.
    max_samples : int
        Rows per task (0 = all): a seeded, label-stratified sample (``eval.tasks.sample_rows``).
    mode : str
        ``finlora`` (FinLoRA's protocol) or ``fast`` (label log-likelihood for closed tasks).
    batch_size : int
        Starting batch size; halved on out-of-memory and kept for later tasks.
    out_dir : str | Path | None
        When given, write ``results.json``, ``results.md``, ``results.png`` and ``predictions/<task>.jsonl``.
    progress : bool
        Show a tqdm bar per task.

    Returns
    -------
    dict[str, TaskResult]
        Task name -> result, in the requested order.
    """
    if mode not in MODES:
        raise EvalError(f"evaluation mode must be one of {', '.join(MODES)}, got '{mode}'")
    names = resolve_task_names(tasks)
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise EvalError(f"data directory {data_dir} does not exist")
    test_dir = resolve_test_dir(data_dir)
    log.info("evaluating %d task(s) in %s mode from %s: %s", len(names), mode, test_dir, ", ".join(names))
    from tqdm import tqdm

    loaded = {name: load_task_rows(TASKS[name], test_dir, max_samples) for name in names}
    results: dict[str, TaskResult] = {}
    size = batch_size
    # one bar over every row of every task: its ETA is the whole evaluation's
    with tqdm(total=sum(len(rows) for rows, _ in loaded.values()), desc="all tasks", unit="ex",
              disable=not progress, dynamic_ncols=True) as bar:
        for name in names:
            task = TASKS[name]
            rows, source = loaded[name]
            if not rows:
                results[name] = _no_data(task, mode, source)
                log.info("task %s: %s", name, source)
            else:
                bar.set_description(f"{name} ({mode})")
                results[name], size = evaluate_task(model, tokenizer, task, rows, mode, size, source, progress,
                                                    advance=bar.update)
            if out_dir is not None:  # after every task: a killed evaluation keeps what it finished
                write_outputs({k: r.to_json() for k, r in results.items()},
                              {k: r.predictions for k, r in results.items() if r.status == "ok"}, Path(out_dir),
                              title)
    return results
