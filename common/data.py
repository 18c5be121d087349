"""FinLoRA data: reading, the task registry, the held-out split, partitioning and tokenization.

Rows are FinLoRA JSONL objects with a ``context`` (the whole prompt) and a ``target`` (the answer). The
training loss covers only the answer and the EOS token that ends it: the prompt is masked with -100, as
in FinLoRA, so the model learns to answer rather than to reproduce the prompt.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finlora.common.config import DataConfig, PROJECT_ROOT
from finlora.common.logs import get_logger
from finlora.common.sample_data import sentiment_rows

log = get_logger(__name__)

IGNORE_INDEX = -100

Row = dict[str, str]


class DataError(ValueError):
    """A data file or data source is unusable; the message names the file (and line) and what was expected."""


@dataclass(frozen=True)
class TrainTask:
    """One of FinLoRA's training sets.

    Attributes
    ----------
    file : str
        Path of the JSONL below the data directory.
    hf_id : str
        Hugging Face dataset id to use when the local file is absent and the hub is reachable.
    """

    file: str
    hf_id: str


TRAIN_TASKS: dict[str, TrainTask] = {
    # FinLoRA's general tasks
    "sentiment": TrainTask("train/sentiment.jsonl", "FinGPT/fingpt-sentiment-train"),
    "fpb": TrainTask("train/fpb.jsonl", "TheFinAI/en-fpb"),
    "fiqa": TrainTask("train/fiqa.jsonl", "TheFinAI/fiqa-sentiment-classification"),
    "tfns": TrainTask("train/tfns.jsonl", "zeroshot/twitter-financial-news-sentiment"),
    "headline": TrainTask("train/headline.jsonl", "FinGPT/fingpt-headline-cls"),
    "ner": TrainTask("train/ner.jsonl", "FinGPT/fingpt-ner-cls"),
    # XBRL reporting / analysis
    "finer": TrainTask("train/finer.jsonl", "FinGPT/fingpt-finer"),
    "xbrl_term": TrainTask("train/xbrl_term.jsonl", "wangd12/XBRL_analysis"),
    "formula": TrainTask("train/formula.jsonl", "wangd12/XBRL_analysis"),
    "financebench": TrainTask("train/financebench.jsonl", "PatronusAI/financebench"),
}
"""FinLoRA's train sets. ``headline`` and ``finer`` have no local copy here (see shared/data/MANIFEST.md)."""


def default_data_dir(configured: str = "") -> Path:
    """The FinLoRA data directory: the configured one, ``$FINLORA_DATA_DIR``, or ``../shared/data``."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("FINLORA_DATA_DIR"):
        return Path(os.environ["FINLORA_DATA_DIR"]).expanduser()
    return PROJECT_ROOT.parent / "shared" / "data"


def read_jsonl(path: str | Path) -> list[Row]:
    """Read FinLoRA JSONL, failing on the first bad line with the file, line number and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows: list[Row] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            rows.append(_validated_row(obj, f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path}: holds no rows (expected JSON objects with 'context' and 'target')")
    return rows


def _validated_row(obj: Any, where: str) -> Row:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'context' and 'target', got {type(obj).__name__}")
    for field in ("context", "target"):
        value = obj.get(field)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field '{field}' must be a non-empty string, got {value!r:.60}")
    return {"context": obj["context"], "target": obj["target"]}


def _rows_from_hub(dataset_id: str) -> list[Row]:
    """Rows of a hub dataset's train split, mapping FinGPT's instruction/input/output columns to FinLoRA's."""
    import datasets

    ds = datasets.load_dataset(dataset_id, split="train")
    rows = []
    for i, ex in enumerate(ds):
        if "context" in ex and "target" in ex:
            obj = {"context": ex["context"], "target": ex["target"]}
        elif {"instruction", "input", "output"} <= set(ex):
            obj = {"context": f"Instruction: {ex['instruction']}\nInput: {ex['input']}\nAnswer: ",
                   "target": ex["output"]}
        else:
            raise DataError(f"{dataset_id}[{i}]: expected columns context/target or instruction/input/output, "
                            f"got {sorted(ex)}")
        rows.append(_validated_row(obj, f"{dataset_id}[{i}]"))
    return rows


def load_rows(cfg: DataConfig) -> list[Row]:
    """All rows of the configured source: ``sample``, a task name, a JSONL path, or a hub dataset id."""
    source = cfg.source
    if source == "sample":
        return sentiment_rows()
    if source in TRAIN_TASKS:
        task = TRAIN_TASKS[source]
        local = default_data_dir(cfg.dir) / task.file
        if local.is_file():
            return read_jsonl(local)
        log.info("task %s: %s not found, trying the hub dataset %s", source, local, task.hf_id)
        try:
            return _rows_from_hub(task.hf_id)
        except Exception as exc:  # offline, gated or renamed: say what was tried
            raise DataError(f"task '{source}': no local file {local} and the hub dataset {task.hf_id} could "
                            f"not be loaded ({exc.__class__.__name__}: {exc})") from exc
    path = Path(source).expanduser()
    if path.suffix == ".jsonl" or path.exists():
        return read_jsonl(path)
    try:
        return _rows_from_hub(source)
    except Exception as exc:
        raise DataError(f"data source '{source}' is neither 'sample', a task ({', '.join(TRAIN_TASKS)}), an "
                        f"existing JSONL file nor a loadable hub dataset ({exc.__class__.__name__})") from exc


def split_heldout(rows: Sequence[Row], size: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministically hold out ``size`` rows (capped at a fifth of the data) for the server's evaluation.

    Both the server and every simulated institution call this with the same seed, so the held-out rows
    are never trained on by anyone.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = min(size, len(rows) // 5)
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [rows[i] for i in train], [rows[i] for i in held]


def partition_rows(rows: Sequence[Row], num_partitions: int, partition_id: int, partitioner: str = "iid",
                   alpha: float = 0.5, seed: int = 0) -> list[Row]:
    """The rows of one simulated institution, using flwr-datasets' partitioners.

    ``dirichlet`` skews the label (``target``) mix per institution, the usual model of banks whose clients
    differ; it needs a classification-style target (at most 64 distinct answers).
    """
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if len(rows) < num_partitions:
        raise DataError(f"{len(rows)} rows cannot be split across {num_partitions} institutions")
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    ds = datasets.Dataset.from_list(list(rows))
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
        ds = ds.shuffle(seed=seed)
    elif partitioner == "dirichlet":
        labels = {r["target"] for r in rows}
        if len(labels) > 64:
            raise DataError(f"dirichlet partitioning needs a label-like 'target' (<= 64 distinct values), "
                            f"this data has {len(labels)}; use partitioner 'iid'")
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="target", alpha=alpha,
                                    min_partition_size=1, self_balancing=True, seed=seed)
    else:
        raise DataError(f"data.partitioner must be 'iid' or 'dirichlet', got '{partitioner}'")
    part.dataset = ds
    return [dict(r) for r in part.load_partition(partition_id)]


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``labels`` is -100 on the prompt, the answer ids (and EOS) elsewhere."""

    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def encode_rows(rows: Sequence[Row], tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenize prompt and answer separately, append EOS, mask the prompt; cut long prompts from the left."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; finlora appends EOS to every answer")
    prompts = tokenizer([r["context"] for r in rows], add_special_tokens=True)["input_ids"]
    answers = tokenizer([r["target"] for r in rows], add_special_tokens=False)["input_ids"]
    examples = []
    for prompt, answer in zip(prompts, answers):
        answer = (answer + [eos])[: max_length - 1]
        prompt = prompt[-(max_length - len(answer)):]
        examples.append(Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return examples


def length_grouped_batches(examples: Sequence[Example], batch_size: int, seed: int,
                           megabatch_factor: int = 16) -> list[list[int]]:
    """Index batches of similar length, in random order (like HF's ``LengthGroupedSampler``).

    Shuffle, cut into mega-batches of ``batch_size * megabatch_factor``, sort each by length, cut into
    batches, shuffle the batches: padding drops sharply while every epoch stays a random permutation.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    mega = batch_size * megabatch_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: len(examples[i].input_ids), reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors ``input_ids``, ``attention_mask``, ``labels`` for a causal LM."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def iterate_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    """Length-sorted batches in a fixed order, for evaluation."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_id)
