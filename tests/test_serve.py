"""``finlora serve`` as a real server process on loopback, driven by a real HTTP client.

The adapters are three different random LoRA adapters on the tiny model; every answer is checked against PEFT's
own ``generate`` with that one adapter loaded, so a request served with the wrong adapter (or none) fails.
"""

from __future__ import annotations

import json
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from finlora.common.config import ConfigError, load_config
from finlora.common.flower_processes import free_port
from finlora.common.model import load_base_model
from finlora.server.serving.cli import adapter_specs
from tests.conftest import make_random_adapter, popen_cli, run_cli, stop_all, wait_healthy

PROMPTS = {"a0": "The sentiment of this news is", "a1": "Revenue rose",
           "a2": "Operating profit fell to EUR 3 million from EUR 5 million, the company said.",
           "__base__": "Net sales"}
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    for i in range(4):
        make_random_adapter((root / "more" if i == 2 else root) / f"a{i}", seed=i)
    token = secrets.token_hex(16)
    (root / "token").write_text(token)
    port = free_port()
    log = root / "serve.log"
    proc = popen_cli("serve", "--model", "tiny", "--adapter", f"a0={root / 'a0'}", "--adapter", f"a1={root / 'a1'}",
                     "--adapters-dir", str(root / "more"), "--max-loras", "2", "--port", str(port),
                     "--admin-token-file", str(root / "token"), log=log)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
    yield {"url": url, "root": root, "token": token, "proc": proc, "log": log}
    stop_all(proc)


def _reference(root: Path, adapter: str, prompt: str) -> str:
    """PEFT's own greedy generate with only this adapter (or none) on a freshly loaded base."""
    from peft import PeftModel

    model, tokenizer, _ = load_base_model(load_config().model)
    if adapter != "__base__":
        model = PeftModel.from_pretrained(model, str(root / ("more" if adapter == "a2" else "") / adapter))
    enc = tokenizer([prompt], return_tensors="pt")
    with torch.inference_mode():
        out = model.eval().generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _complete(url: str, model: str, prompt: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                      **extra}, timeout=120)


def test_concurrent_requests_for_different_adapters_share_batches_and_each_gets_its_own_adapter(served):
    url, root = served["url"], served["root"]
    jobs = [(name, prompt) for name, prompt in PROMPTS.items()] * 3
    passes_before = httpx.get(f"{url}/health").json()["forward_passes"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: _complete(url, *job), jobs))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    expected = {name: _reference(root, name, prompt) for name, prompt in PROMPTS.items()}
    assert len(set(expected.values())) == len(expected), "the adapters must answer differently for this test"
    for (name, _), reply in zip(jobs, replies):
        body = reply.json()
        assert body["model"] == name and body["object"] == "text_completion"
        assert body["choices"][0]["text"] == expected[name], name
        assert body["usage"]["completion_tokens"] <= MAX_TOKENS
    health = httpx.get(f"{url}/health").json()
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in replies)
    # one request alone needs one forward pass per generated token: fewer passes means requests shared them
    assert health["forward_passes"] - passes_before < tokens, (health, tokens)
    assert len(health["active"]) <= 2  # --max-loras 2, though three adapters were used


def test_requests_join_a_running_batch_and_still_get_exactly_their_adapters_answer(served):
    """Continuous batching: a long request is decoding when three others arrive; they join its batch (their KV
    caches are merged into the running one, left-padded) and each answer still equals PEFT's for its adapter."""
    url, root = served["url"], served["root"]
    joined_before = httpx.get(f"{url}/health").json()["joined_running_batch"]
    decoding = threading.Event()

    def long_request() -> str:
        pieces = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                "model": "a0", "prompt": PROMPTS["a0"], "max_tokens": 1000, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    decoding.set()  # its first token is out: it is in the running batch now
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(pieces)

    with ThreadPoolExecutor(4) as pool:
        long = pool.submit(long_request)
        assert decoding.wait(60)
        late = [pool.submit(_complete, url, name, PROMPTS[name]) for name in ("a1", "a2", "__base__")]
        replies = [f.result() for f in late]
        assert len(long.result()) > 0
    assert httpx.get(f"{url}/health").json()["joined_running_batch"] > joined_before
    for name, reply in zip(("a1", "a2", "__base__"), replies):
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == _reference(root, name,
                                                                                            PROMPTS[name]), name


def test_models_lists_every_adapter_and_the_base(served):
    body = httpx.get(f"{served['url']}/v1/models").json()
    ids = {m["id"] for m in body["data"]}
    assert {"__base__", "a0", "a1", "a2"} <= ids and "a3" not in ids


def test_streaming_chat_gives_the_same_text_as_one_reply(served):
    url = served["url"]
    request = {"model": "a1", "messages": [{"role": "user", "content": "Is this positive?"}],
               "max_tokens": MAX_TOKENS}
    whole = httpx.post(f"{url}/v1/chat/completions", json=request, timeout=120).json()
    pieces, done, finish = [], False, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**request, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert chunk["object"] == "chat.completion.chunk"
            choice = chunk["choices"][0]
            pieces.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    assert done and finish == whole["choices"][0]["finish_reason"]
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body, status, names", [
    ({"model": "no-such-adapter", "prompt": "x"}, 404, "no-such-adapter"),
    ({"model": "a0"}, 400, "prompt"),
    ({"model": "a0", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "a0", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "a0", "prompt": ""}, 400, "prompt"),
    ({"prompt": "x"}, 400, "model"),
])
def test_bad_requests_get_a_4xx_that_names_the_field_and_the_server_goes_on(served, body, status, names):
    reply = httpx.post(f"{served['url']}/v1/completions", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    assert names in reply.json()["error"]["message"]
    assert httpx.post(f"{served['url']}/v1/completions", content=b"{not json", timeout=30,
                      headers={"content-type": "application/json"}).status_code == 400
    assert _complete(served["url"], "a0", "still serving").status_code == 200


def test_a_request_longer_than_the_context_window_is_cut_not_crashed(served):
    reply = httpx.post(f"{served['url']}/v1/completions", timeout=300,
                       json={"model": "a1", "prompt": "revenue " * 2000, "max_tokens": 4096})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= 1024  # the tiny model's context


def test_adapters_are_published_and_withdrawn_while_serving_with_the_admin_token(served, tmp_path):
    url, root = served["url"], served["root"]
    auth = {"Authorization": f"Bearer {served['token']}"}
    new = {"name": "a3", "path": str(root / "a3")}
    assert httpx.post(f"{url}/admin/adapters", json=new).status_code == 401  # no token
    wrong = {"Authorization": "Bearer " + "0" * 32}
    assert httpx.post(f"{url}/admin/adapters", json=new, headers=wrong).status_code == 401
    bad = httpx.post(f"{url}/admin/adapters", json={"name": "x", "path": str(tmp_path)}, headers=auth)
    assert bad.status_code == 400 and str(tmp_path) in bad.json()["error"]["message"]
    assert httpx.post(f"{url}/admin/adapters", json=new, headers=auth).status_code == 201
    assert httpx.post(f"{url}/admin/adapters", json=new, headers=auth).status_code == 409  # already there
    served_a3 = _complete(url, "a3", PROMPTS["a0"])
    assert served_a3.status_code == 200
    assert served_a3.json()["choices"][0]["text"] == _reference(root, "a3", PROMPTS["a0"])
    assert httpx.delete(f"{url}/admin/adapters/a3").status_code == 401
    assert httpx.delete(f"{url}/admin/adapters/a3", headers=auth).status_code == 200
    assert _complete(url, "a3", "x").status_code == 404
    assert httpx.delete(f"{url}/admin/adapters/a3", headers=auth).status_code == 404


def test_eval_scores_a_served_adapter_as_it_scores_the_adapter_directory(served, eval_data_dir, tmp_path):
    common = ("--tasks", "fpb", "--max-samples", "8", "--data-dir", str(eval_data_dir), "--mode", "finlora",
              "--batch-size", "4", "--no-progress")
    remote = run_cli("eval", "--endpoint", served["url"] + "/v1", "--adapter", "a0", "--out", str(tmp_path / "r"),
                     *common)
    assert remote.returncode == 0, remote.stderr[-2000:]
    local = run_cli("eval", "--model", "tiny", "--adapter", str(served["root"] / "a0"), "--out",
                    str(tmp_path / "l"), *common)
    assert local.returncode == 0, local.stderr[-2000:]
    answers = [[json.loads(line)["raw_output"] for line in (tmp_path / d / "predictions" / "fpb.jsonl").open()]
               for d in ("r", "l")]
    assert len(answers[0]) == 8 and any(answers[0]) and answers[0] == answers[1]
    missing = run_cli("eval", "--endpoint", served["url"], "--adapter", "nope", *common)
    assert missing.returncode == 2 and "--adapter nope: not served" in missing.stderr, missing.stderr


def test_bad_command_lines_fail_before_loading_the_model(tmp_path):
    for pairs, adapters_dir, message in ((["nameonly"], None, "expected NAME=DIR"),
                                         ([f"x={tmp_path}"], None, "not a PEFT adapter directory"),
                                         (["x=a", "x=b"], None, "given twice"),
                                         ([], str(tmp_path / "none"), "no such directory"),
                                         ([], str(tmp_path), "no adapter directories")):
        with pytest.raises(ConfigError, match=message):
            adapter_specs(pairs, adapters_dir)
    proc = run_cli("serve", "--model", "tiny", "--adapter", f"x={tmp_path}", timeout=120)  # one line, exit 2
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("finlora: --adapter x="), proc.stderr
