"""Mixture of LoRA experts: a router trained over frozen experts (PEFT's X-LoRA), saved, reloaded exactly, scored."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from peft import PeftModel

from finlora.client.moe_train import train_router
from finlora.common.config import load_config
from finlora.common.model import load_base_model
from finlora.common.moe import MixtureError, ROUTER_KEY, build_mixture, load_mixture, save_mixture
from finlora.common.flower_processes import free_port
from finlora.common.sample_data import sentiment_rows
from tests.conftest import make_random_adapter, popen_cli, run_cli, stop_all, wait_healthy


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

    # the comparison: the mixture against each expert and a multi-task adapter, on the same rows
    make_random_adapter(tmp_path / "multi", seed=42, scale=0.2)
    compared = run_cli("moe", "compare", "--model", "tiny", "--moe", str(tmp_path / "moe"), "--multitask",
                       str(tmp_path / "multi"), "--tasks", "fpb", "--max-samples", "8", "--data-dir",
                       str(eval_data_dir), "--out", str(tmp_path / "cmp"), "--no-progress")
    assert compared.returncode == 0, compared.stderr[-2000:]
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert list(table) == ["expert-e0", "expert-e1", "multitask", "mixture"]
    assert all(table[c]["fpb"]["n"] == 8 and table[c]["fpb"]["status"] == "ok" for c in table)
    # same rows, same protocol: the mixture's column is exactly what 'finlora eval --moe' scored
    assert table["mixture"]["fpb"]["accuracy"] == fpb["accuracy"] and table["mixture"]["fpb"]["f1"] == fpb["f1"]
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| fpb | 8 |" in markdown and "**" in markdown and "Best on:" in markdown
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "expert-e0" / "results.json").is_file()
    missing = run_cli("moe", "compare", "--model", "tiny", "--moe", str(tmp_path))
    assert missing.returncode == 2 and "--moe" in missing.stderr and "moe.json" in missing.stderr, missing.stderr


def _greedy(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """The mixture's own greedy decoding, one prompt at a time and without a cache: the served text must equal it."""
    ids, out = tokenizer([prompt], return_tensors="pt")["input_ids"], []
    with torch.inference_mode():
        for _ in range(max_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_a_mixture_is_served_under_one_name_beside_plain_adapters(experts, tmp_path):
    """``finlora serve --moe mix=DIR`` as a real process: requests for the mixture and for an adapter arrive
    together; the mixture's answers equal its own decoding (batched with padding on the server, alone here), and
    /v1/models lists it with its experts. A bad --moe fails before any model loads."""
    model, tokenizer = _fresh_base()
    mixture = build_mixture(model, experts, depth=1)
    train_router(mixture, tokenizer, sentiment_rows(n=16, seed=4), steps=2, batch_size=4, lr=1e-2, max_length=64,
                 seed=0, progress=False)
    save_mixture(mixture, experts, tmp_path / "moe", depth=1, layer_size=256, top_k=None, base_model="tiny")
    port, log = free_port(), tmp_path / "serve.log"
    proc = popen_cli("serve", "--model", "tiny", "--moe", f"mix={tmp_path / 'moe'}", "--adapter",
                     f"e0={experts['e0']}", "--port", str(port), log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert listed["mix"]["kind"] == "mixture-of-experts" and listed["mix"]["experts"] == ["e0", "e1"]
        assert "e0" in listed
        prompts = ["Revenue rose", "The sentiment of this news is", "Operating profit fell to EUR 3 million."]
        jobs = [("mix", p) for p in prompts] + [("e0", prompts[0])]
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: httpx.post(f"{url}/v1/completions", json={
                "model": job[0], "prompt": job[1], "max_tokens": 5}, timeout=120), jobs))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        references = {"mix": load_mixture(_fresh_base()[0], tmp_path / "moe"),
                      "e0": PeftModel.from_pretrained(_fresh_base()[0], str(experts["e0"])).eval()}
        for (name, prompt), reply in zip(jobs, replies):
            assert reply.json()["model"] == name
            assert reply.json()["choices"][0]["text"] == _greedy(references[name], tokenizer, prompt, 5), (name,
                                                                                                          prompt)
    finally:
        stop_all(proc)
    bad = run_cli("serve", "--model", "tiny", "--moe", f"mix={tmp_path}", "--port", str(free_port()))
    assert bad.returncode == 2 and "--moe" in bad.stderr and "moe.json" in bad.stderr, bad.stderr[-1000:]
