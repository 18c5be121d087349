"""Mixture of LoRA experts: a router trained over frozen experts (PEFT's X-LoRA), saved, reloaded exactly, scored."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from peft import PeftModel

from finlora.client.moe_train import train_router
from finlora.common.config import ConfigError, load_config
from finlora.common.model import load_base_model
from finlora.common.moe import MixtureError, ROUTER_KEY, build_mixture, load_mixture, router_state, save_mixture
from finlora.common.flower_processes import free_port
from finlora.common.sample_data import sentiment_rows
from finlora.server.router_round import router_strategy
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


def test_a_router_is_trained_federatedly_with_dp_and_secure_aggregation_and_audits(experts, tmp_path):
    """``finlora simulate --moe`` with the defaults of every run: three institutions train the router over the same
    frozen experts through Flower (SuperLink, Ray) for two rounds, with DP-SGD against their own ledgers, commit to
    and prove their updates, and send them only masked. No institution's router reaches the server (no array bytes
    from any client), each round's saved mixture loads as it is and moved, and ``finlora zk audit`` recomputes both
    rounds' routers from the commitments alone. (That the average is FedAvg's, example-weighted, is the next
    test's; resuming is a LoRA run's, ``test_simulation.py``, through the same run directory.)"""
    proc = run_cli("simulate", "--clients", "3", "--rounds", "2", "--moe", f"e0={experts['e0']}", "--moe",
                   f"e1={experts['e1']}", "--local-steps", "2", "--out", str(tmp_path), "--run-id", "fedmoe")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "DP (sample level" in proc.stdout and "secure aggregation" in proc.stdout, proc.stdout[:600]
    run_dir = tmp_path / "fedmoe"
    metrics = {m["round"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(metrics) == [0, 1, 2] and all(metrics[r]["num_clients"] == 3 for r in (1, 2))
    assert all(not metrics[r]["rejected"] and not metrics[r]["errors"] for r in (1, 2))
    assert all(0 < p["epsilon"] <= 8.0 for r in (1, 2) for p in metrics[r]["privacy"].values())
    wire = [json.loads(line) for line in (run_dir / "wire.jsonl").read_text().splitlines()]
    from_clients = [w for w in wire if w["direction"] == "client->server"]
    assert from_clients and sum(w["array_bytes"] for w in from_clients) == 0  # masked vectors travel as config

    routers = [router_state(load_mixture(_fresh_base()[0], run_dir / f"round-{r}")) for r in (0, 1, 2)]
    assert all(not torch.equal(routers[r][k], routers[r - 1][k]) for r in (1, 2) for k in routers[0])
    audit = run_cli("zk", "audit", str(run_dir), "--keys", str(run_dir / "keys"))
    assert audit.returncode == 0 and "audit OK: 3/3" in audit.stdout, audit.stdout + audit.stderr
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert ledger[0]["secagg"] and ledger[0]["adapter_file"] == "round-0/router.safetensors"

    with pytest.raises(ConfigError, match="moe.experts.*strategy.name = fedavg"):
        load_config({"moe.experts": "a=/a,b=/b", "strategy.name": "fedadam"}).check_combinations()
    missing = run_cli("simulate", "--clients", "2", "--moe", f"e0={experts['e0']}", "--moe", f"x={tmp_path}",
                      "--out", str(tmp_path))
    assert missing.returncode == 2 and "--moe" in missing.stderr and "'x'" in missing.stderr, missing.stderr


def test_a_bad_router_reply_is_left_out_and_too_few_valid_ones_keep_the_previous_router():
    """The server side of a router round, in process: NaN, a wrong shape and an out-of-bound router are each left
    out with their reason, an extra metric key cannot break Flower's average, and the average is example-weighted;
    a round with fewer valid routers than ``strategy.min-train-nodes`` keeps the previous one."""
    cfg = load_config({"moe.experts": "a=/a,b=/b", "zk.enabled": False, "dp.enabled": False,
                       "strategy.min-train-nodes": 2}).check_combinations()
    key = f"base_model.{ROUTER_KEY}.layers.0.weight"
    strategy = router_strategy(cfg, {key: (2, 8)}, round_offset=0, verifier=None)

    def reply(node: int, value: float, examples: int = 10, shape=(2, 8), **extra) -> Message:
        metrics = MetricRecord({"num-examples": examples, "train-loss": 1.0, **extra})
        content = RecordDict({"arrays": ArrayRecord({key: torch.full(shape, value)}), "metrics": metrics})
        return Message(content=content, metadata=Metadata(
            run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"r{node}",
            group_id="1", created_at=time.time(), ttl=600.0, message_type="train"))

    strategy.current_global = {key: np.zeros((2, 8), np.float32)}
    arrays, metrics = strategy.aggregate_train(1, [reply(1, 0.1), reply(2, 0.4, examples=30), reply(3, float("nan")),
                                                   reply(4, 0.1, shape=(8, 2)), reply(5, 10.0),
                                                   reply(6, 0.2, examples=20, bonus=7.0)])
    expected = (0.1 * 10 + 0.4 * 30 + 0.2 * 20) / 60
    assert np.allclose(arrays.to_numpy_ndarrays()[0], expected) and metrics["train-loss"] == 1.0
    rejected = strategy.outcome(1).rejected
    assert sorted(rejected) == ["3", "4", "5"] and sorted(strategy.outcome(1).clients) == ["1", "2", "6"]
    assert "NaN" in rejected["3"] and "shape" in rejected["4"] and "max-update-norm" in rejected["5"], rejected
    assert strategy.aggregate_train(2, [reply(1, 0.1), reply(3, float("nan"))]) == (None, None)
    assert "fewer than strategy.min-train-nodes = 2" in strategy.outcome(2).kept_previous
