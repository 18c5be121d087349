"""Mixture of LoRA experts: a router trained over frozen experts (PEFT's X-LoRA), saved, reloaded exactly, scored."""

from __future__ import annotations

import json

import pytest
import torch

from finlora.client.moe_train import train_router
from finlora.common.config import load_config
from finlora.common.model import load_base_model
from finlora.common.moe import MixtureError, ROUTER_KEY, build_mixture, load_mixture, save_mixture
from finlora.common.sample_data import sentiment_rows
from tests.conftest import make_random_adapter, run_cli


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("experts")
    for i in range(2):
        make_random_adapter(root / f"e{i}", seed=10 + i, scale=0.2)
    return {"e0": root / "e0", "e1": root / "e1"}


def _fresh_base():
    model, tokenizer, _ = load_base_model(load_config().model)
    return model, tokenizer


def test_only_the_router_trains_and_a_saved_mixture_reloads_exactly(experts, tmp_path):
    model, tokenizer = _fresh_base()
    mixture = build_mixture(model, experts, depth=2)
    trainable = {n for n, p in mixture.named_parameters() if p.requires_grad}
    assert trainable and all(ROUTER_KEY in n for n in trainable)
    before = {n: p.detach().clone() for n, p in mixture.named_parameters()}
    losses = train_router(mixture, tokenizer, sentiment_rows(n=32, seed=3), steps=4, batch_size=4, lr=1e-2,
                          max_length=128, seed=0, progress=False)
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    after = dict(mixture.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trainable  # the router moved; no expert and no base weight did

    save_mixture(mixture, experts, tmp_path / "moe", depth=2, layer_size=256, top_k=None, base_model="tiny")
    reloaded = load_mixture(_fresh_base()[0], tmp_path / "moe")
    batch = tokenizer(["The company said operating profit rose."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(mixture.eval()(**batch).logits, reloaded(**batch).logits)


def test_a_broken_mixture_is_named(experts, tmp_path):
    with pytest.raises(MixtureError, match="at least 2 experts"):
        build_mixture(_fresh_base()[0], {"e0": experts["e0"]})
    with pytest.raises(MixtureError, match="'bad'.*not a PEFT adapter directory"):
        build_mixture(_fresh_base()[0], {"e0": experts["e0"], "bad": tmp_path})
    with pytest.raises(MixtureError, match="moe.json missing"):
        load_mixture(_fresh_base()[0], tmp_path)


def test_moe_train_and_eval_from_the_command_line(experts, eval_data_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=24, seed=5)))
    train = run_cli("moe", "train", "--model", "tiny", "--expert", f"e0={experts['e0']}", "--expert",
                    f"e1={experts['e1']}", "--data", str(data), "--steps", "3", "--batch-size", "4",
                    "--out", str(tmp_path / "moe"), "--no-progress")
    assert train.returncode == 0, train.stderr[-2000:]
    assert "router" in train.stdout and (tmp_path / "moe" / "router.safetensors").is_file()
    scored = run_cli("eval", "--model", "tiny", "--moe", str(tmp_path / "moe"), "--tasks", "fpb", "--max-samples",
                     "8", "--data-dir", str(eval_data_dir), "--out", str(tmp_path / "eval"), "--no-progress")
    assert scored.returncode == 0, scored.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    fpb = results["fpb"]
    assert fpb["status"] == "ok" and fpb["n"] == 8
    bad = run_cli("moe", "train", "--expert", f"e0={experts['e0']}", "--expert", f"x={tmp_path}", "--data",
                  str(data), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "'x'" in bad.stderr and "not a PEFT adapter directory" in bad.stderr, bad.stderr
