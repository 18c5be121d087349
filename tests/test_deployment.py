"""A real federation on loopback: certificates, SuperLink with TLS + node auth, SuperNodes, faults at the door."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.flower_processes import free_port
from common.sample_data import sentiment_rows
from tests.conftest import REPO, flower_processes, run_cli


def _popen_cli(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simulation.cli", *args], cwd=REPO, env=dict(os.environ),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("federation")
    assert run_cli("certs", "init", "--out", str(root / "certs"), "--server-name", "localhost,127.0.0.1").returncode == 0
    for name in ("bank-0", "bank-1", "intruder"):
        out = root / ("outsider" if name == "intruder" else "nodes")
        assert run_cli("certs", "node", "--out", str(out), "--name", name).returncode == 0
    data = root / "all.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=300, seed=9)))
    split = run_cli("data", "split", "--data", str(data), "--clients", "3", "--out", str(root / "data"))
    assert split.returncode == 0, split.stderr
    return root


def test_keys_are_private_and_split_covers_the_data(federation):
    for key in ("certs/ca.key", "certs/server.key", "nodes/bank-0.auth.key", "nodes/bank-0.key"):
        assert stat.S_IMODE((federation / key).stat().st_mode) == 0o600, key
    assert (federation / "nodes" / "bank-0.auth.pub").read_text().startswith("ecdsa-sha2-nistp256 ")
    rows = [line for i in range(3) for line in (federation / "data" / f"bank-{i}.jsonl").read_text().splitlines()]
    assert sorted(rows) == sorted((federation / "all.jsonl").read_text().splitlines())


@pytest.mark.parametrize("case", ["bad data", "not a CA", "missing key"])
def test_client_fails_fast_before_connecting(federation, tmp_path, case):
    args = {"--superlink": "127.0.0.1:1", "--ca": str(federation / "certs" / "ca.crt"),
            "--key": str(federation / "nodes" / "bank-0.auth.key"), "--data": str(federation / "data" / "bank-0.jsonl")}
    if case == "bad data":
        bad = tmp_path / "bank.jsonl"
        bad.write_text('{"context": "Q\\nAnswer: ", "target": "positive"}\n{"context": "Q"\n')
        args["--data"], expected = str(bad), f"{bad}:2: not valid JSON"
    elif case == "not a CA":
        args["--ca"], expected = str(federation / "certs" / "server.pem"), "not a CA certificate"
    else:
        args["--key"], expected = str(tmp_path / "none.auth.key"), "node key not found"
    start = time.monotonic()
    proc = run_cli("client", *[x for kv in args.items() for x in kv])
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert time.monotonic() - start < 30  # it never waited for the (absent) SuperLink


def test_tls_federation_with_node_auth_refuses_an_unregistered_node(federation, tmp_path):
    before = flower_processes()
    port = free_port()
    # each message starts a fresh ClientApp process in Flower 1.42 deployments: keep the rounds few
    (tmp_path / "run.toml").write_text('num-rounds = 1\n"strategy.min-available-nodes" = 2\n'
                                       '"strategy.fraction-evaluate" = 0.0\n"strategy.round-timeout" = 300.0\n')
    server = _popen_cli("server", "--state", str(tmp_path / "state"), "--config", str(tmp_path / "run.toml"),
                        "--certs", str(federation / "certs"), "--nodes", str(federation / "nodes"),
                        "--host", "127.0.0.1", "--port", str(port), log=tmp_path / "server.log")
    deadline = time.monotonic() + 120  # institutions join once their keys are registered (as in the README)
    while "waiting for institutions" not in (tmp_path / "server.log").read_text():
        assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        time.sleep(0.5)
    common = ["--superlink", f"127.0.0.1:{port}", "--ca", str(federation / "certs" / "ca.crt"), "--max-wait-time", "20"]
    clients = [_popen_cli("client", *common, "--key", str(federation / "nodes" / f"bank-{i}.auth.key"),
                          "--data", str(federation / "data" / f"bank-{i}.jsonl"), log=tmp_path / f"bank-{i}.log")
               for i in range(2)]
    intruder = _popen_cli("client", *common, "--key", str(federation / "outsider" / "intruder.auth.key"),
                          "--data", str(federation / "data" / "bank-2.jsonl"), log=tmp_path / "intruder.log")
    try:
        assert intruder.wait(timeout=120) == 3
        assert server.wait(timeout=400) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for p in (server, intruder, *clients):
            if p.poll() is None:
                p.terminate()
        for p in (server, intruder, *clients):
            p.wait(timeout=60)
    time.sleep(2)
    assert not flower_processes() - before, "SuperLink/SuperNode processes were left behind"
    assert "the SuperLink refused this node" in (tmp_path / "intruder.log").read_text()
    run_dir = tmp_path / "state" / "runs" / "federation"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1] and metrics[1]["num_clients"] == 2
    assert metrics[1]["heldout_loss"] < metrics[0]["heldout_loss"]
    audit = run_cli("zk", "audit", str(run_dir))
    assert audit.returncode == 0, audit.stdout
