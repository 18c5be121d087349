"""A real federation on loopback: certificates, SuperLink with TLS + node auth behind the Fleet gateway, SuperNodes,
faults at the door and during the run (a SuperNode killed mid-round, the server killed and restarted, an
institution pinned to another app refusing the server's)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from finlora.client.node_down import deactivate_node
from finlora.common.adapter import arrays_digest, read_adapter_dir
from finlora.common.flower_processes import free_port
from finlora.common.io import read_jsonl_records
from finlora.common.sample_data import sentiment_rows
from tests.conftest import REPO, run_cli

# Each message starts a fresh ClientApp process in Flower 1.42 deployments (20-40 s on 2 cores): few rounds, few
# steps, no server-side evaluation. The round timeout bounds every send/receive phase.
FAST_RUN = ('"train.local-steps" = 4\n"eval.heldout" = false\n"eval.every" = 0\n"strategy.fraction-train" = 1.0\n'
            '"strategy.fraction-evaluate" = 0.0\n"strategy.min-train-nodes" = 2\n"strategy.min-available-nodes" = 2\n'
            '"zk.secagg" = false\n')
"""Two institutions: secure aggregation (on by default) needs three, so these runs send committed updates unmasked."""


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("federation")
    certs = run_cli("certs", "init", "--out", str(root / "certs"), "--server-name", "localhost,127.0.0.1")
    assert certs.returncode == 0
    # another federation's CA: a client holding it must not trust our server
    assert run_cli("certs", "init", "--out", str(root / "other-ca"), "--server-name", "localhost").returncode == 0
    for name in ("bank-0", "bank-1", "bank-2", "bank-3", "intruder"):
        out = root / ("outsider" if name == "intruder" else "nodes")
        assert run_cli("certs", "node", "--out", str(out), "--name", name).returncode == 0
    data = root / "all.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=300, seed=9)))
    split = run_cli("data", "split", "--data", str(data), "--clients", "3", "--out", str(root / "data"))
    assert split.returncode == 0, split.stderr
    return root


class Processes:
    """The processes a test starts, and every descendant of theirs it has seen, so that the test can check that
    none is left behind (other Flower processes on the machine are not ours and are ignored)."""

    def __init__(self, federation: Path, tmp_path: Path, port: int) -> None:
        self.federation, self.tmp_path, self.port = federation, tmp_path, port
        self.started: list[subprocess.Popen] = []
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        # each test keeps its own privacy ledgers: budgets spent by another test's run do not carry over
        self.env = dict(os.environ, FINLORA_DP_STATE=str(tmp_path / "dp-state"))

    def cli(self, *args: str, log: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "finlora.simulation.cli", *args], cwd=REPO, env=self.env,
                                stdout=open(self.tmp_path / log, "w"), stderr=subprocess.STDOUT)
        self.started.append(proc)
        return proc

    def server(self, config: str, log: str = "server.log", host: str = "127.0.0.1") -> subprocess.Popen:
        (self.tmp_path / "run.toml").write_text(config)
        proc = self.cli("server", "--state", str(self.tmp_path / "state"), "--config", str(self.tmp_path / "run.toml"),
                        "--certs", str(self.federation / "certs"), "--nodes", str(self.federation / "nodes"),
                        "--host", host, "--port", str(self.port), log=log)
        # institutions join once their keys are registered (as in the README)
        self.wait_for(lambda: "waiting for institutions" in self.log(log), f"{log}: ready", 120, proc)
        return proc

    def client(self, name: str, *extra: str, key: Path | None = None, ca: Path | None = None,
               max_wait: float = 20) -> subprocess.Popen:
        bank = name if name in ("bank-0", "bank-1", "bank-2") else "bank-2"  # bank-3 shares bank-2's rows
        return self.cli("client", "--superlink", f"127.0.0.1:{self.port}", "--max-wait-time", str(max_wait),
                        "--ca", str(ca or self.federation / "certs" / "ca.crt"),
                        "--key", str(key or self.federation / "nodes" / f"{name}.auth.key"), "--name", name,
                        "--state", str(self.tmp_path / "nodes" / name),
                        "--data", str(self.federation / "data" / f"{bank}.jsonl"), *extra, log=f"{name}.log")

    def log(self, name: str) -> str:
        return (self.tmp_path / name).read_text()

    def watch(self) -> None:
        for proc in self.started:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    self.seen[(child.pid, child.create_time())] = child
            except psutil.Error:
                pass

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float,
                 proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.watch()
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{what}: process exited with {proc.returncode}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:.0f}s\n{self.tail()}")
            time.sleep(0.5)

    def wait(self, proc: subprocess.Popen, timeout: float) -> int:
        self.wait_for(lambda: proc.poll() is not None, "exit", timeout)
        return proc.returncode

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.tmp_path.glob("*.log")))

    def stop(self) -> None:
        self.watch()
        for proc in self.started:
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: finlora stops the Flower processes it started
        for proc in self.started:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def left_behind(self) -> list[str]:
        time.sleep(2)
        alive = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {_cmdline(p)[:200]}")
            except psutil.Error:
                pass
        return alive


@pytest.fixture
def processes(federation: Path, tmp_path: Path):
    procs = Processes(federation, tmp_path, free_port())
    try:
        yield procs
    finally:
        procs.stop()
    assert not procs.left_behind(), f"processes left behind: {procs.left_behind()}"


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def _metrics(run_dir: Path) -> list[dict]:
    return read_jsonl_records(run_dir / "metrics.jsonl")


def _rounds_logged(run_dir: Path) -> list[int]:
    return [m["round"] for m in _metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []


def _node_ids(server_log: str) -> dict[str, int]:
    return {name: int(node) for name, node in
            re.findall(r"institution (\S+) (?:already )?registered as SuperNode (\d+)", server_log)}


def _audit_ok(run_dir: Path, keys: Path) -> None:
    audit = run_cli("zk", "audit", str(run_dir), "--keys", str(keys))  # the institutions' published keys
    assert audit.returncode == 0 and "FAIL" not in audit.stdout, audit.stdout + audit.stderr


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


def _app_hash(log: str, pattern: str) -> str:
    found = re.findall(pattern + r" ([0-9a-f]{64})", log)
    assert len(found) == 1, (pattern, log[-3000:])
    return found[0]


def test_secure_aggregation_over_tls_under_fedadam_survives_an_institution_killed_after_its_masked_update(
        federation, tmp_path, processes):
    """Secure aggregation in the TLS deployment (on by default: the config does not mention it), 3 institutions at
    threshold 2, under Flower's FedAdam. bank-2's SuperNode is SIGKILLed right after it sent its masked update (its
    second query.secagg reply), and its finlora client deactivates it at the SuperLink in its place. The server
    gets its self-mask from the two others' shares, the round aggregates all three committed updates (bank-2's
    included: it is in the sum), the published adapter is FedAdam's step along their average, and the audit
    recomputes that step and checks the sum against the three weighted commitments. No message to the server
    carried an update. (The simulation test covers the default threshold, 3 of 4, and more dropouts than it
    tolerates.)"""
    server = processes.server('num-rounds = 1\n"strategy.round-timeout" = 240.0\n"train.local-steps" = 4\n'
                              '"eval.heldout" = false\n"eval.every" = 0\n"strategy.fraction-evaluate" = 0.0\n'
                              '"strategy.name" = "fedadam"\n"zk.secagg-threshold" = 2\n')
    clients = [processes.client(f"bank-{i}") for i in range(3)]

    def masked_update_sent() -> bool:
        log = processes.log("bank-2.log")
        parts = log.split("Sending: query.secagg message")
        return len(parts) >= 3 and "Sent successfully" in parts[2]

    processes.wait_for(masked_update_sent, "bank-2 sent its masked update", 500, server)
    supernodes = [p for p in psutil.Process(clients[2].pid).children(recursive=True)
                  if "flower-supernode" in _cmdline(p)]
    assert len(supernodes) == 1, supernodes
    supernodes[0].send_signal(signal.SIGKILL)
    assert processes.wait(server, 600) == 0, processes.tail()
    assert all(processes.wait(c, 60) == 0 for c in clients[:2]), processes.tail()
    run_dir = tmp_path / "state" / "runs" / "federation"
    ledger = read_jsonl_records(run_dir / "ledger.jsonl")
    assert ledger[0]["secagg"] is True and ledger[0]["server_optimizer"]["name"] == "fedadam"
    assert "kept_previous" not in ledger[1], ledger[1]
    assert sorted(c["node_id"] for c in ledger[1]["clients"]) == ["bank-0", "bank-1", "bank-2"]
    dead = str(_node_ids(processes.log("server.log"))["bank-2"])
    assert f"told the SuperLink that SuperNode {dead} is gone" in processes.log("bank-2.log")
    assert "secagg" in _metrics(run_dir)[1]["errors"][dead], _metrics(run_dir)[1]["errors"]
    for entry in read_jsonl_records(run_dir / "wire.jsonl"):
        if entry["direction"] == "client->server":
            assert entry["array_bytes"] == 0, entry  # masked vectors and keys travel as bytes, no tensors
    _audit_ok(run_dir, federation / "nodes")  # FedAdam's step recomputed from the ledger (zk/server_opt.py)


def test_faults_at_the_door_and_in_the_run_a_killed_server_resumes_a_killed_supernode_is_left_out(federation,
                                                                                                  tmp_path,
                                                                                                  processes):
    """The faults of a 4-institution, 2-round federation, in one run (each federation costs minutes):

    1. At the door: an unregistered key and a client holding another federation's CA are refused (exit 3).
    2. App pinning: bank-3 pins another app hash than the one the server submits, so it refuses the app before
       installing it, in every round; the server records an error for it, the rounds aggregate the others, and
       the server names it when it ends. The others' default pin ('auto': their own finlora's FAB) is the server's.
    3. The server machine crashes (finlora server, SuperLink, ServerApp: kill -9) once round 1 is saved; the same
       command restarts it on the same state directory. The institutions' SuperNodes reconnect by themselves, the
       run resumes at round 2 from the saved round-1 adapter, and nothing saved before the crash is rewritten.
    4. bank-2's SuperNode is SIGKILLed once it has received the resumed run's round-2 message. Its finlora client
       deactivates it at the SuperLink in its place (no minute of missed heartbeats), the SuperLink answers for it
       with an error reply, and round 2 aggregates bank-0 and bank-1. Another institution's key cannot deactivate
       a node (bank-1 tries it on bank-0 after round 1)."""
    # min-available-nodes = 4: the resumed round samples bank-2 too (it waits for all four to reconnect); unmasked
    # committed updates (secure aggregation across a server crash is not what this test is about)
    config = ('num-rounds = 2\n"strategy.round-timeout" = 240.0\n"train.local-steps" = 4\n"eval.every" = 0\n'
              '"strategy.fraction-train" = 1.0\n"strategy.fraction-evaluate" = 0.0\n'
              '"strategy.min-train-nodes" = 2\n"strategy.min-available-nodes" = 4\n"zk.secagg" = false\n')
    server = processes.server(config)
    # a budget above the plan: training done for the lost round 2 was charged to the ledgers before the crash
    clients = [processes.client(f"bank-{i}", "--dp-epsilon", "16", "--allow-unmasked", max_wait=300)
               for i in range(3)]
    other_app = hashlib.sha256(b"some other app").hexdigest()
    processes.client("bank-3", "--app-hash", other_app, "--no-resident", max_wait=300)  # pinned to another app
    intruder = processes.client("intruder", key=federation / "outsider" / "intruder.auth.key")
    wrong_ca = processes.client("wrong-ca", "--sign-key", str(federation / "nodes" / "bank-1.key"),
                                key=federation / "nodes" / "bank-1.auth.key", ca=federation / "other-ca" / "ca.crt")
    assert processes.wait(intruder, 300) == 3
    assert processes.wait(wrong_ca, 300) == 3, processes.log("wrong-ca.log")
    assert "the SuperLink refused this node" in processes.log("intruder.log")
    said = [line for line in processes.log("wrong-ca.log").splitlines() if line.startswith("finlora client wrong-ca:")]
    assert any("TLS" in line and str(federation / "other-ca" / "ca.crt") in line for line in said), said

    run_dir = tmp_path / "state" / "runs" / "federation"
    processes.wait_for(lambda: 1 in _rounds_logged(run_dir), "round 1 saved", 400, server)
    # only a node itself can say it is gone: bank-1's key cannot deactivate bank-0 (bank-0 stays in round 2)
    with pytest.raises(httpx.HTTPStatusError, match="401"):
        deactivate_node(f"127.0.0.1:{processes.port}", federation / "certs" / "ca.crt",
                        federation / "nodes" / "bank-1.auth.key", _node_ids(processes.log("server.log"))["bank-0"])
    before = {m["round"]: m for m in _metrics(run_dir)}
    saved = {p: (p.read_bytes(), p.stat().st_mtime_ns) for k in (0, 1) for p in (run_dir / f"round-{k}").iterdir()}
    wire_before = read_jsonl_records(run_dir / "wire.jsonl")

    crashed = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    assert any("flower-superlink" in _cmdline(p) for p in crashed)
    for p in crashed:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(crashed, timeout=30)
    processes.started.remove(server)
    server.wait()
    crash = time.monotonic()

    again = processes.server(config, log="server-again.log")
    restarted = time.monotonic()

    def bank_2_has_the_resumed_round() -> bool:
        run = re.findall(r"Successfully started run (\d+)", processes.log("server-again.log"))
        said = processes.log("bank-2.log").split(f"[RUN {run[0]}]", 1) if run else []
        return len(said) == 2 and "Receiving: train message" in said[1]  # not the crashed run's message

    processes.wait_for(bank_2_has_the_resumed_round, "bank-2 received round 2", 400, again)
    supernodes = [p for p in psutil.Process(clients[2].pid).children(recursive=True)
                  if "flower-supernode" in _cmdline(p)]
    assert len(supernodes) == 1, supernodes
    supernodes[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert processes.wait(again, 600) == 0, processes.tail()
    print(f"restart took {restarted - crash:.0f}s; resumed run finished {time.monotonic() - killed:.0f}s after the "
          "SuperNode was killed")
    # they reconnected on their own, and left once the resumed run's last round was answered
    assert all(processes.wait(c, 60) == 0 for c in clients[:2]), processes.tail()
    assert processes.wait(clients[2], 60) != 0  # its SuperNode is gone
    assert "finished (round 2 of 2 answered)" in processes.log("bank-0.log")

    log = processes.log("server-again.log")
    assert "(resuming)" in log and "resuming" in log.split("ready,")[1]
    nodes = _node_ids(log)
    assert nodes == _node_ids(processes.log("server.log"))  # the same SuperNodes, already registered
    assert log.count("already registered as SuperNode") == 4  # every key in nodes/: bank-0 .. bank-3
    assert "left unfinished by an earlier server process, stopped" in log  # its queued messages were dropped
    after = _metrics(run_dir)
    assert [m["round"] for m in after] == [0, 1, 2]  # each round once
    assert after[0] == before[0] and after[1] == before[1]  # nothing recomputed
    assert after[1]["num_clients"] == 3 and after[1]["heldout_loss"] < after[0]["heldout_loss"]
    for path, (content, mtime) in saved.items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, path
    assert (run_dir / "round-2" / "adapter_model.safetensors").is_file()
    assert (run_dir / "round-2" / "adapter_config.json").is_file()
    wire = read_jsonl_records(run_dir / "wire.jsonl")
    assert [w for w in wire if w["round"] <= 1] == wire_before
    sent_round2 = {w["sha256"]["arrays"] for w in wire
                   if w["round"] == 2 and w["direction"] == "server->client" and w["message_type"] == "train"}
    assert sent_round2 == {arrays_digest(read_adapter_dir(run_dir / "round-1"))}

    # the killed SuperNode: the round aggregated the two others, and names it with its error
    dead = nodes["bank-2"]
    assert after[2]["num_clients"] == 2 and not after[2]["kept_previous"]
    assert str(dead) not in after[2]["clients"] and str(dead) in after[2]["errors"], after[2]["errors"]
    assert f"node {dead} failed" in log
    assert f"told the SuperLink that SuperNode {dead} is gone" in processes.log("bank-2.log")
    superlink_log = (tmp_path / "state" / "superlink.log").read_text()  # both SuperLinks', appended
    assert f"Deactivated node_id={dead}" in superlink_log
    assert f"Deactivated node_id={nodes['bank-0']}" not in superlink_log  # bank-1's attempt was refused

    # app pinning: each server's FAB is the honest institutions' 'auto' pin, and not bank-3's, which refused it
    # before installing it, in both rounds
    submitted = _app_hash(processes.log("server.log"), "finlora server: app hash")
    assert _app_hash(log, "finlora server: app hash") == submitted
    for name in ("bank-0", "bank-1"):
        assert set(re.findall(r"runs only the app with hash ([0-9a-f]{64})",
                              processes.log(f"{name}.log"))) == {submitted}
    refusal = f"app hash {submitted} is not the pinned {other_app}"
    assert f"REFUSED the app the server sent: {refusal}" in processes.log("bank-3.log")
    refused_node = str(nodes["bank-3"])
    for k in (1, 2):
        assert refused_node not in after[k]["clients"] and refusal in after[k]["errors"][refused_node], after[k]
    installed = {name: list((tmp_path / "nodes" / name / "flwr-home" / "apps").glob("*"))
                 for name in ("bank-0", "bank-3")}
    assert installed["bank-0"] and not installed["bank-3"], installed  # the refused app was never installed

    # the server ends like simulate: the summary table, the plot, and who was left out by name
    assert "held-out loss" in log and "bytes sent/client" in log and "loss.png" in log
    assert "round 2: institution bank-3 was left out: " in log, log[-3000:]
    assert "finlora server: scored on: held-out loss on 48 rows of sample" in log, log[-3000:]
    _audit_ok(run_dir, federation / "nodes")
