"""The FinLoRA benchmark package: scoring rules by hand, fast-mode ranking against a direct computation,
the task registry with and without data, and ``finlora eval`` end to end on the tiny model with an adapter."""

import json

import numpy as np
import pytest
import torch

from finlora.common.adapter import initial_adapter, load_lora_state, lora_state, save_adapter_dir, shapes_of
from finlora.common.config import load_config
from finlora.common.model import get_model_bundle, lora_config, resolve_model_path
from finlora.common.sample_data import sentiment_rows
from finlora.eval import TASKS, EvalError, evaluate_model
from finlora.eval.batching import run_in_batches
from finlora.eval.fast import best_labels, label_logprobs, label_surface_forms, label_token_ids, sequence_logprob
from finlora.eval.generate import generate_texts
from finlora.eval.reference import finlora_reference_answers
from finlora.eval.scoring import (batched_label_score, exact_match, finlora_answer, finlora_label_score, first_label,
                                  formula_match, match_score, numeric_match, split_batched, three_class_score, token_f1)
from finlora.eval.tasks import load_task_rows, resolve_task_names
from tests.conftest import SHARED_DATA, run_cli

SENT = ("negative", "neutral", "positive")


# --- scoring (pure) ---------------------------------------------------------------------------------------

def test_finlora_label_rule_on_hand_made_outputs():
    outputs = ["Positive.", "neutral/positive", "", "negative", "I think positive"]
    targets = ["positive", "positive", "neutral", "negative", "neutral"]
    score = finlora_label_score(outputs, targets, SENT)
    assert score.labels == ["positive", "neutral", "", "negative", "positive"]  # earliest label wins
    assert score.correct == [True, False, False, True, False]
    assert score.accuracy == pytest.approx(2 / 5)
    # responses = target when correct, else the raw output; per-class F1: positive 2/3 (support 2),
    # neutral 0 (support 2), negative 1 (support 1); the raw strings have support 0
    assert score.f1 == pytest.approx((2 * 2 / 3 + 2 * 0 + 1 * 1) / 5)


def test_finlora_answer_and_tie_break():
    assert finlora_answer(" positive\nAnswer: negative ") == "negative"
    assert finlora_answer("  neutral. ") == "neutral."
    # same start index: the longer label wins (FinLoRA leaves this to set order)
    assert first_label("InterestExpenseDebt", ["InterestExpense", "InterestExpenseDebt"]) == "interestexpensedebt"
    assert first_label("strong negative, not mildly", ["mildly negative", "strong negative"]) == "strong negative"


def test_batched_finer_answers_truncated_and_padded():
    outputs = ["TagA, TagB", "TagC,TagC,TagB", ""]
    targets = ["TagA,TagB,TagC", "TagA,TagC", "TagB"]
    flat_out, flat_target = split_batched(outputs, targets)
    assert flat_out == ["TagA", "TagB", "", "TagC", "TagC", ""]  # padded with "", then truncated
    assert flat_target == ["TagA", "TagB", "TagC", "TagA", "TagC", "TagB"]
    score = batched_label_score(outputs, targets)
    assert score.correct == [True, True, False, False, True, False]
    assert score.accuracy == pytest.approx(3 / 6)
    # per class: A P=1 R=1/2 -> 2/3; B P=1 R=1/2 -> 2/3; C P=1/2 R=1/2 -> 1/2; each support 2
    assert score.f1 == pytest.approx((2 * 2 / 3 + 2 * 2 / 3 + 2 * 0.5) / 6)


def test_nwgi_seven_and_three_classes():
    outputs = ["mildly positive", "strong negative", "neutral"]
    targets = ["moderately positive", "mildly negative", "mildly positive"]
    seven = finlora_label_score(outputs, targets, TASKS["nwgi"].labels)
    assert seven.accuracy == 0.0
    three = three_class_score(outputs, targets)
    assert three["accuracy_3class"] == pytest.approx(2 / 3)
    # true [pos, neg, pos], pred [pos, neg, neu]: pos P=1 R=1/2 -> 2/3 (support 2); neg 1 (support 1)
    assert three["f1_3class"] == pytest.approx((2 * 2 / 3 + 1) / 3)


def test_extraction_and_math_matches():
    assert numeric_match("15,092.44", "15092.44")
    assert numeric_match("$15092.443 is the NPV", "15092.44")
    assert not numeric_match("15092.40", "15092.44")
    assert not numeric_match("", "15092.44")
    assert numeric_match("16116000000", "16116000000") and not numeric_match("16116", "16116000000")
    assert exact_match("us-gaap:CommonStockValue.", "us-gaap:CommonStockValue")
    assert not exact_match("us-gaap:CommonStock", "us-gaap:CommonStockValue")
    target = "(6226000000 / 38542000000) * 100"
    assert formula_match("(6226000000/38542000000)*100", target)
    assert formula_match("6226000000 / 38542000000 * 100", target)  # same value
    assert not formula_match("(6226000000 / 38542000000)", target)
    assert not formula_match("__import__('os')", target)
    score = match_score(["1.5", "about 2.0", "x"], ["1.50", "2", "3"], "numeric")
    assert score.accuracy == pytest.approx(2 / 3)
    assert score.extra["accuracy_finlora"] == pytest.approx(1 / 3)  # FinLoRA: "2" found in "about 2.0" only


def test_text_fallback_metrics():
    assert token_f1("the cash flow of firm", "cash flow statement") == pytest.approx(4 / 7)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


# --- inference ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """The tiny model with its initial adapter (B = 0: the base model's outputs). The bundle is the process's cached
    one, which a test run earlier on this worker may have loaded other LoRA weights into (test_adapter.py does):
    these tests must not depend on which tests shared their worker."""
    cfg = load_config()
    bundle = get_model_bundle(cfg.model, cfg.lora)
    load_lora_state(bundle.model, initial_adapter(shapes_of(lora_state(bundle.model)), cfg.lora.seed))
    return bundle


def test_fast_mode_matches_direct_sequence_loglik(tiny):
    model, tok = tiny.model, tiny.tokenizer
    prompts = [r["context"] for r in sentiment_rows(5, seed=3)]
    prompts[1] = "Answer: "  # very short: exercises left padding next to long prompts
    labels = list(TASKS["nwgi"].labels)  # multi-token labels
    scores, _, _ = label_logprobs(model, tok, prompts, labels, batch_size=2)
    answers = label_token_ids(tok, labels)
    for prompt, row in zip(prompts, scores):
        prompt_ids = tok(prompt)["input_ids"]
        direct = [sequence_logprob(model, prompt_ids, a) for a in answers]  # one label at a time, no padding
        assert row == pytest.approx(direct, abs=1e-4)
        assert best_labels([row], labels) == [labels[int(np.argmax(direct))]]


def test_fast_mode_scores_labels_as_the_data_writes_them():
    assert label_surface_forms(("yes", "no"), ["Yes", "No", "Yes", "no", "No"]) == ["Yes", "No"]
    assert label_surface_forms(SENT, ["neutral", "positive"]) == list(SENT)  # absent label: as registered


def test_generation_is_batch_invariant(tiny):
    prompts = [r["context"] for r in sentiment_rows(5, seed=4)] + ["Answer: "]
    batched, _, _ = generate_texts(tiny.model, tiny.tokenizer, prompts, 6, batch_size=4, stop_on_newline=False)
    single, _, _ = generate_texts(tiny.model, tiny.tokenizer, prompts, 6, batch_size=1, stop_on_newline=False,
                                  sort_by_length=False)
    assert batched == single and all(batched)


def test_batch_halves_on_out_of_memory():
    seen = []

    def run(chunk):
        if len(chunk) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated by the callback)")
        seen.extend(chunk)

    assert run_in_batches(list(range(7)), 8, run) == 2
    assert seen == list(range(7))
    with pytest.raises(ValueError):
        run_in_batches([0, 1], 2, lambda chunk: (_ for _ in ()).throw(ValueError("not an OOM")))


# --- registry and data -------------------------------------------------------------------------------------

def _row(task: str, i: int) -> dict:
    """A FinLoRA-style row for ``task`` (the answer format of the real set; content generated)."""
    spec = TASKS[task]
    if spec.labels:
        return {"context": f"Instruction: classify item {i}.\nAnswer: ", "target": spec.labels[i % len(spec.labels)]}
    if spec.metric == "batched_label":
        return {"context": f"Tags: TagA, TagB, TagC. Question {i}?\nOutput US GAAP tags:",
                "target": ",".join(["TagA", "TagB", "TagC"][: 1 + i % 3])}
    return {"context": f"Question {i}: what is the value?\nAnswer:", "target": str(1000 + i)}


def _write_tasks(directory, tasks, n=6):
    directory.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        (directory / f"{task}.jsonl").write_text("".join(json.dumps(_row(task, i)) + "\n" for i in range(n)))
    return directory


def test_every_task_loads_when_present_and_reports_no_data_when_absent(tmp_path):
    present = _write_tasks(tmp_path / "all", TASKS)
    for name, task in TASKS.items():
        rows, source = load_task_rows(task, present, max_samples=4, allow_hub=False)
        assert len(rows) == 4 and source.split(";")[0].endswith(f"{name}.jsonl"), name
        rows, reason = load_task_rows(task, tmp_path / "empty", allow_hub=False)
        assert rows == [] and reason.startswith("no data"), name


def test_missing_tasks_report_no_data_in_results(tiny, tmp_path):
    data = _write_tasks(tmp_path / "data", ["fpb", "xbrl_value"])
    results = evaluate_model(tiny.model, tiny.tokenizer, "all", data, max_samples=3, mode="fast", batch_size=4,
                             progress=False)
    assert list(results) == list(TASKS)
    for name, r in results.items():
        if name in ("fpb", "xbrl_value"):
            assert r.status == "ok" and r.n == 3 and 0 <= r.accuracy <= 1 and 0 <= r.f1 <= 1
        else:
            assert (r.status, r.n, r.accuracy, r.f1) == ("no data", 0, None, None), name
    assert results["fpb"].inference == "loglik" and results["xbrl_value"].inference == "generate"


def test_finlora_mode_scores_what_it_records(tiny, tmp_path):
    data = _write_tasks(tmp_path / "data", ["fpb", "finer"])
    results = evaluate_model(tiny.model, tiny.tokenizer, "fpb,finer", data, max_samples=5, mode="finlora",
                             batch_size=2, progress=False)
    fpb = results["fpb"]
    rescored = finlora_label_score([p["raw_output"] for p in fpb.predictions],
                                   [p["target"] for p in fpb.predictions], SENT)
    assert fpb.accuracy == rescored.accuracy and fpb.inference == "generate"
    finer = results["finer"]
    assert finer.extra["questions"] == sum(len(p["target"].split(",")) for p in finer.predictions)


def test_finlora_mode_reproduces_finlora_loop(tiny, tmp_path):
    rows = sentiment_rows(11, seed=5) + [{"context": "Answer: ", "target": "neutral"}]  # a partial last batch
    (tmp_path / "fpb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = evaluate_model(tiny.model, tiny.tokenizer, ["fpb"], tmp_path, mode="finlora", batch_size=4,
                             progress=False)
    ours = [p["raw_output"] for p in results["fpb"].predictions]
    reference = finlora_reference_answers(tiny.model, tiny.tokenizer, [r["context"] for r in rows],
                                          TASKS["fpb"].max_new_tokens)
    assert ours == reference and any(ours)


@pytest.mark.skipif(not (SHARED_DATA / "test").is_dir(), reason="shared FinLoRA data not present")
@pytest.mark.parametrize("name", list(TASKS))
def test_shared_test_files_load(name):
    rows, source = load_task_rows(TASKS[name], SHARED_DATA / "test", allow_hub=False)
    if (SHARED_DATA / "test" / f"{name}.jsonl").is_file():
        assert rows and all(r["context"] and r["target"] for r in rows)
        if name == "nwgi":
            assert {r["target"] for r in rows} <= set(TASKS["nwgi"].labels)
        if TASKS[name].labels and name != "nwgi":
            assert {r["target"].lower() for r in rows} <= set(TASKS[name].labels)
    else:
        assert rows == [] and source.startswith("no data")


def test_bad_task_and_data_are_named(tmp_path):
    with pytest.raises(EvalError, match="unknown evaluation task.*nope"):
        resolve_task_names("fpb,nope")
    bad = tmp_path / "fpb.jsonl"
    bad.write_text('{"context": "x", "target": "positive"}\n{"context": "y"\n')
    with pytest.raises(EvalError, match=r"fpb.jsonl:2: not valid JSON"):
        load_task_rows(TASKS["fpb"], tmp_path, allow_hub=False)


# --- finlora eval, end to end --------------------------------------------------------------------------------

def test_cli_eval_with_adapter_writes_all_outputs(tiny, tmp_path):
    cfg = load_config()
    original = lora_state(tiny.model)
    rng = np.random.default_rng(7)
    arrays = {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in original.items()}
    data = _write_tasks(tmp_path / "data", ["fpb", "finer"], n=6)
    adapter, out = tmp_path / "round-1", tmp_path / "out"
    save_adapter_dir(arrays, lora_config(cfg.lora, resolve_model_path("tiny")), adapter)
    proc = run_cli("eval", "--model", "tiny", "--adapter", str(adapter), "--data-dir", str(data),
                   "--tasks", "fpb,finer,headline", "--max-samples", "4", "--mode", "fast", "--out", str(out),
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"fpb", "finer", "headline"}
    for name in ("fpb", "finer"):
        r = results[name]
        assert r["n"] == 4 and r["mode"] == "fast" and r["status"] == "ok"
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["f1"] <= 1 and r["seconds"] > 0 and r["samples_per_s"] > 0
        preds = [json.loads(x) for x in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert len(preds) == 4 and all({"id", "target", "raw_output", "label"} <= set(p) for p in preds)
    assert results["headline"]["status"] == "no data" and results["headline"]["accuracy"] is None
    assert not (out / "predictions" / "headline.jsonl").exists()
    assert "| fpb | 4 |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the adapter was applied: the CLI's label scores equal ours with the same LoRA weights loaded
    preds = [json.loads(x) for x in (out / "predictions" / "fpb.jsonl").read_text().splitlines()]
    from finlora.eval.tasks import sample_rows

    prompts = [r["context"] for r in sample_rows([_row("fpb", i) for i in range(6)], 4)[0]]  # the rows evaluated
    try:
        load_lora_state(tiny.model, arrays)
        with_adapter, _, _ = label_logprobs(tiny.model, tiny.tokenizer, prompts, list(SENT), 4)
        load_lora_state(tiny.model, {k: np.zeros_like(v) if ".lora_B." in k else v for k, v in arrays.items()})
        without, _, _ = label_logprobs(tiny.model, tiny.tokenizer, prompts, list(SENT), 4)
    finally:
        load_lora_state(tiny.model, original)
    cli_scores = [[p["label_logprobs"][label] for label in SENT] for p in preds]
    assert np.allclose(cli_scores, with_adapter, atol=1e-3)
    assert not np.allclose(cli_scores, without, atol=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "fpb,bogus"], "unknown evaluation task"),
    (["--adapter", "/nonexistent/round-9"], "--adapter /nonexistent/round-9: no such adapter directory"),
    (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data: no such directory"),
])
def test_cli_bad_input_exits_2(args, message):
    proc = run_cli("eval", "--model", "tiny", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_cli_malformed_jsonl_exits_2(tmp_path):
    (tmp_path / "fpb.jsonl").write_text('{"context": "x", "target": "positive"}\nnot json\n')
    proc = run_cli("eval", "--model", "tiny", "--data-dir", str(tmp_path), "--tasks", "fpb", "--out",
                   str(tmp_path / "out"))
    assert proc.returncode == 2 and "fpb.jsonl:2: not valid JSON" in proc.stderr, proc.stderr[-2000:]


def test_max_samples_is_a_seeded_label_stratified_sample():
    """FinLoRA files are grouped by label: the first N rows of tfns hold no 'neutral'. The sample keeps the mix."""
    from finlora.eval.tasks import sample_rows

    rows = ([{"context": f"q{i}", "target": "negative"} for i in range(15)]
            + [{"context": f"q{i}", "target": "positive"} for i in range(20)]
            + [{"context": f"q{i}", "target": "neutral"} for i in range(65)])
    sample, how = sample_rows(rows, 20)
    labels = [r["target"] for r in sample]
    assert len(sample) == 20
    assert (labels.count("neutral"), labels.count("positive"), labels.count("negative")) == (13, 4, 3)
    assert sample == sample_rows(rows, 20)[0]  # seeded: the same rows every time
    assert [rows.index(r) for r in sample] == sorted(rows.index(r) for r in sample)  # file order kept
    assert "label-stratified sample of 20 of 100 rows" in how
    assert {r["target"] for r in sample_rows(rows, 3)[0]} == {"negative", "positive", "neutral"}  # every label


def test_results_are_written_after_each_task(tiny, tmp_path, monkeypatch):
    """An evaluation stopped during its second task keeps the first task's results on disk."""
    import finlora.eval.runner as runner

    data = _write_tasks(tmp_path / "data", ["fpb", "xbrl_value"])
    real = runner.evaluate_task

    def stop_at_the_second(model, tokenizer, task, *args, **kwargs):
        if task.name == "xbrl_value":
            raise KeyboardInterrupt  # what Ctrl-C during the second task raises
        return real(model, tokenizer, task, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_task", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(tiny.model, tiny.tokenizer, "fpb,xbrl_value", data, max_samples=3, mode="fast", batch_size=4,
                       progress=False, out_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "fpb" in json.dumps(saved) and "xbrl_value" not in json.dumps(saved)


def test_one_progress_bar_counts_every_row_of_every_task(tiny, tmp_path, capsys):
    """The bar's total is all rows of all tasks, so its remaining-time estimate is the whole evaluation's."""
    data = _write_tasks(tmp_path / "data", ["fpb", "xbrl_value"])
    evaluate_model(tiny.model, tiny.tokenizer, "fpb,xbrl_value", data, max_samples=3, mode="fast", batch_size=4,
                   progress=True)
    err = capsys.readouterr().err
    assert "6/6" in err and "3/3" not in err, err[-2000:]  # one bar over 3 + 3 rows, no per-task bars
