import json

import pytest

from finlora.common.data import (IGNORE_INDEX, DataError, encode_rows, length_grouped_batches, partition_rows,
                                 read_jsonl, split_heldout)
from finlora.common.model import get_model_bundle
from finlora.common.sample_data import sentiment_rows
from tests.conftest import SHARED_DATA


def _write(tmp_path, lines):
    path = tmp_path / "bank.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("bad_line, reason", [
    ('{"context": "Q: x\\nAnswer: ", "target": "positive"', "not valid JSON"),
    ('{"context": "Q: x\\nAnswer: "}', "field 'target' must be a non-empty string"),
    ('{"context": "", "target": "neutral"}', "field 'context' must be a non-empty string"),
    ('["context", "target"]', "expected a JSON object"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_line, reason):
    good = json.dumps({"context": "Instruction: ...\nAnswer: ", "target": "positive"})
    path = _write(tmp_path, [good, good, bad_line, good])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert f"{path}:3:" in str(err.value)
    assert reason in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_sample_rows_are_deterministic_and_balanced():
    rows = sentiment_rows()
    assert rows == sentiment_rows()
    labels = [r["target"] for r in rows]
    assert {labels.count(x) for x in set(labels)} == {200}
    assert all(r["context"].endswith("\nAnswer: ") for r in rows)


def test_heldout_and_partitions_are_disjoint_and_cover():
    rows = [{"context": f"c{i}", "target": ["a", "b", "c"][i % 3]} for i in range(300)]
    train, held = split_heldout(rows, 48, seed=0)
    assert len(held) == 48 and not {r["context"] for r in train} & {r["context"] for r in held}
    for partitioner in ("iid", "dirichlet"):
        parts = [partition_rows(train, 4, i, partitioner, alpha=0.3, seed=1) for i in range(4)]
        seen = [r["context"] for p in parts for r in p]
        assert sorted(seen) == sorted(r["context"] for r in train), partitioner
    skewed = [partition_rows(train, 4, i, "dirichlet", alpha=0.1, seed=1) for i in range(4)]
    mixes = [{lab: sum(r["target"] == lab for r in p) / len(p) for lab in "abc"} for p in skewed]
    assert max(max(m.values()) for m in mixes) > 0.6  # label skew, unlike IID's ~1/3


def test_encoding_masks_prompt_and_appends_eos():
    bundle = get_model_bundle(*_tiny_cfg())
    tok = bundle.tokenizer
    rows = sentiment_rows(n=6)
    for row, ex in zip(rows, encode_rows(rows, tok, max_length=256)):
        answer = [t for t in ex.labels if t != IGNORE_INDEX]
        assert answer[-1] == tok.eos_token_id
        assert tok.decode(answer[:-1]) == row["target"]
        n_prompt = len(ex.labels) - len(answer)
        assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex.input_ids[n_prompt:] == answer
    long = encode_rows([{"context": "word " * 500, "target": "negative"}], tok, max_length=32)[0]
    assert len(long.input_ids) == 32 and tok.decode([t for t in long.labels if t != IGNORE_INDEX][:-1]) == "negative"


def test_length_grouped_batches_cover_and_group():
    bundle = get_model_bundle(*_tiny_cfg())
    examples = encode_rows(sentiment_rows(n=256), bundle.tokenizer, 256)
    batches = length_grouped_batches(examples, 8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(256))
    spread = sum(max(len(examples[i].input_ids) for i in b) - min(len(examples[i].input_ids) for i in b)
                 for b in batches) / len(batches)
    import random
    order = list(range(256))
    random.Random(0).shuffle(order)
    naive = [order[i:i + 8] for i in range(0, 256, 8)]
    naive_spread = sum(max(len(examples[i].input_ids) for i in b) - min(len(examples[i].input_ids) for i in b)
                       for b in naive) / len(naive)
    assert spread < naive_spread / 2


@pytest.mark.skipif(not (SHARED_DATA / "train" / "fpb.jsonl").exists(),
                    reason="FinLoRA data (../shared/data) is not present on this machine")
def test_real_finlora_train_sets_parse_and_encode():
    from finlora.common.config import load_config
    from finlora.common.data import load_rows

    for task in ("fpb", "tfns", "fiqa"):
        cfg = load_config({"data.source": task, "data.dir": str(SHARED_DATA)}).data
        rows = load_rows(cfg)
        assert len(rows) > 500 and {"positive", "negative", "neutral"} >= {r["target"] for r in rows}
    bundle = get_model_bundle(*_tiny_cfg())
    examples = encode_rows(rows[:64], bundle.tokenizer, 256)
    assert all(ex.answer_tokens >= 2 for ex in examples)


def _tiny_cfg():
    from finlora.common.config import load_config

    cfg = load_config()
    return cfg.model, cfg.lora
