"""The resident trainer (client/resident/): real processes on a real Unix socket, real tasks, no mocks."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from finlora.client.resident import (ResidentTrainer, TrainerUnavailable, call_trainer, error_reply, ping,
                                     raise_error_reply, read_authkey)
from tests.conftest import REPO


def _wait_answering(socket_path: Path, key_file: Path, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the trainer exited with code {proc.returncode}"
        try:
            return ping(socket_path, read_authkey(key_file))
        except TrainerUnavailable:
            assert time.monotonic() < deadline, "the trainer never answered"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trainer started as ``finlora client`` starts it, and the inputs the server would send in round 1."""
    from flwr.app import ConfigRecord, RecordDict

    from finlora.common.adapter import initial_adapter, select_keys, to_array_record
    from finlora.common.config import load_config
    from finlora.common.model import lora_shapes
    from finlora.common.sample_data import sentiment_rows

    root = tmp_path_factory.mktemp("resident")
    socket_path, key_file = root / "sock" / "trainer.sock", root / "state" / "authkey"
    proc = subprocess.Popen([sys.executable, "-m", "finlora.client.resident", "--socket", str(socket_path),
                             "--authkey-file", str(key_file)], cwd=REPO, env=dict(os.environ),
                            stdout=open(root / "trainer.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    data = root / "bank.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=48, seed=7)))
    cfg = load_config({"dp.enabled": False, "zk.enabled": False, "train.local-steps": 2})  # fast: no DP, no zk
    shapes = lora_shapes(cfg.model, cfg.lora)
    content = RecordDict({"arrays": to_array_record(select_keys(initial_adapter(shapes, cfg.lora.seed), cfg.lora.ffa)),
                          "config": ConfigRecord({"server-round": 1, "num-rounds": cfg.num_rounds})})
    node_config = {"data-path": str(data), "institution": "bank-t", "trainer-socket": str(socket_path),
                   "trainer-authkey-file": str(key_file),
                   "dp-required": False,  # this institution allows the no-DP run config above
                   "secagg-required": False}  # and its unmasked (no zk) updates
    try:
        yield {"proc": proc, "socket": socket_path, "key": key_file, "content": content, "cfg": cfg,
               "node_config": node_config, "log": root / "trainer.log"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _context(setup: dict, **node_config) -> object:
    from flwr.app import Context, RecordDict

    return Context(run_id=7, node_id=11, node_config={**setup["node_config"], **node_config}, state=RecordDict(),
                   run_config=setup["cfg"].to_flat())


def test_model_stays_resident_and_results_match_in_process(setup):
    info = _wait_answering(setup["socket"], setup["key"], setup["proc"])
    assert info["pid"] == setup["proc"].pid and info["base-model-loads"] == 0
    assert stat.S_IMODE(setup["key"].stat().st_mode) == 0o600
    assert stat.S_IMODE(setup["socket"].parent.stat().st_mode) == 0o700
    replies = [call_trainer(setup["socket"], "train", setup["content"], _context(setup))[0] for _ in range(2)]
    metrics = [r["metrics"] for r in replies]
    assert metrics[0]["process-id"] == metrics[1]["process-id"] == setup["proc"].pid
    assert metrics[0]["base-model-loads"] == metrics[1]["base-model-loads"] == 1  # loaded once, then resident
    assert metrics[0]["load-seconds"] > 0 and metrics[1]["load-seconds"] == 0

    from finlora.client.tasks import TASKS
    from finlora.common.adapter import from_array_record

    local = TASKS["train"](setup["content"], _context(setup))  # the same task in this process
    assert local["metrics"]["process-id"] == os.getpid()
    for reply in replies:  # same seed, same threads, same CPU kernels: bit-identical
        remote, here = from_array_record(reply["arrays"]), from_array_record(local["arrays"])
        assert remote.keys() == here.keys()
        for key in here:
            np.testing.assert_array_equal(remote[key], here[key], err_msg=key)
        assert reply["metrics"]["train-loss"] == local["metrics"]["train-loss"]

    reply, state = call_trainer(setup["socket"], "evaluate", setup["content"], _context(setup))
    assert reply["metrics"]["eval-tokens"] > 0 and state is not None
    assert ping(setup["socket"], read_authkey(setup["key"]))["base-model-loads"] == 1


def test_task_errors_come_back_as_the_same_exception(setup):
    from flwr.app import RecordDict

    from finlora.common.adapter import AdapterError, to_array_record

    _wait_answering(setup["socket"], setup["key"], setup["proc"])
    bad = RecordDict({"arrays": to_array_record({"not-a-lora-key": np.zeros(3, dtype=np.float32)}),
                      "config": setup["content"]["config"]})
    with pytest.raises(AdapterError, match="global adapter from the server") as err:
        call_trainer(setup["socket"], "train", bad, _context(setup))
    assert "raised in the resident trainer" in str(err.value.__cause__)  # the trainer's traceback is chained
    assert "Traceback" in str(err.value.__cause__)
    with pytest.raises(ValueError, match="unknown task kind"):
        call_trainer(setup["socket"], "fit", setup["content"], _context(setup))
    assert setup["proc"].poll() is None  # a failed task does not take the trainer down


def test_error_replies_keep_what_the_server_looks_for():
    from finlora.client.privacy import PrivacyBudgetExhausted

    exc = PrivacyBudgetExhausted("round 3 would spend epsilon 9.1 > 8.0")
    with pytest.raises(PrivacyBudgetExhausted) as err:
        raise_error_reply(*error_reply(exc)[1:])
    # what Flower's ClientApp runner puts into the error reason the server matches on
    reason = str(type(err.value)) + ":<'" + str(err.value) + "'>"
    assert "PrivacyBudgetExhausted" in reason and "epsilon 9.1 > 8.0" in reason

    class Unpicklable(Exception):  # a local class cannot be pickled: the text form must carry it
        pass

    try:
        raise Unpicklable("no pickle for me")
    except Unpicklable as exc:
        status, blob, text = error_reply(exc)
    assert status == "error" and blob is None
    with pytest.raises(RuntimeError, match="Unpicklable: no pickle for me") as err:
        raise_error_reply(blob, text)
    assert "Traceback" in str(err.value)


def test_wrong_key_and_absent_trainer_are_refused_clearly(setup, tmp_path):
    _wait_answering(setup["socket"], setup["key"], setup["proc"])
    wrong = tmp_path / "authkey"
    wrong.write_bytes(b"0" * 64)
    wrong.chmod(0o600)
    with pytest.raises(TrainerUnavailable, match="refused the key"):
        call_trainer(setup["socket"], "train", setup["content"],
                     _context(setup, **{"trainer-authkey-file": str(wrong)}))
    wrong.chmod(0o644)
    with pytest.raises(TrainerUnavailable, match="readable by others"):
        call_trainer(setup["socket"], "train", setup["content"],
                     _context(setup, **{"trainer-authkey-file": str(wrong)}))
    assert ping(setup["socket"], read_authkey(setup["key"]))["pid"] == setup["proc"].pid  # still serving
    assert "refused a connection with a wrong key" in setup["log"].read_text()
    missing = tmp_path / "none" / "trainer.sock"
    with pytest.raises(TrainerUnavailable, match="resident trainer of `finlora client` is not running") as err:
        call_trainer(missing, "train", setup["content"], _context(setup), wait_s=0.5)
    assert str(missing) in str(err.value)


def _raw(socket_path: Path, payload: bytes, *, hold: bool = False) -> socket.socket:
    """Connect without the key, read the trainer's challenge, answer ``payload``; unless ``hold``, wait until the
    trainer hangs up (so that it really read the payload) and close."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(socket_path))
    assert b"#CHALLENGE#" in sock.recv(4096)
    sock.sendall(payload)
    if not hold:
        sock.shutdown(socket.SHUT_WR)  # end of input: a truncated frame stays truncated
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        sock.close()
    return sock


MALFORMED_HANDSHAKES = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64),
    "truncated frame": struct.pack("!i", 16) + b"abc",
    "huge length prefix": struct.pack("!i", 0x7FFFFFFF) + b"x" * 32,
    "huge 64-bit length prefix": struct.pack("!i", -1) + struct.pack("!Q", 2**63 - 1),
    "negative length": struct.pack("!i", -2) + b"xx",
    "wrong-length digest": struct.pack("!i", 3) + b"abc",
}


def test_malformed_frames_before_authentication_do_not_end_the_trainer(setup):
    """Security hardening, finding 10: a malformed frame sent to the socket before authentication used to end the
    trainer process (multiprocessing's handshake raised OSError('bad message length') out of accept())."""
    proc = setup["proc"]
    pid = _wait_answering(setup["socket"], setup["key"], proc)["pid"]
    for name, payload in MALFORMED_HANDSHAKES.items():
        _raw(setup["socket"], payload)
        assert ping(setup["socket"], read_authkey(setup["key"]), wait_s=5)["pid"] == pid, name
    assert proc.poll() is None
    dropped = [line for line in setup["log"].read_text().splitlines() if "malformed handshake" in line]
    assert len(dropped) >= 4, setup["log"].read_text()[-3000:]  # one line per dropped connection


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(tmp_path):
    """A peer that connects and never authenticates must not hold the one-request-at-a-time trainer."""
    socket_path, key_file = tmp_path / "s" / "trainer.sock", tmp_path / "authkey"
    log = tmp_path / "trainer.log"
    proc = subprocess.Popen([sys.executable, "-m", "finlora.client.resident", "--socket", str(socket_path),
                             "--authkey-file", str(key_file), "--no-preload", "--handshake-timeout", "1"],
                            cwd=REPO, env=dict(os.environ), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        pid = _wait_answering(socket_path, key_file, proc)["pid"]
        silent = _raw(socket_path, struct.pack("!i", 16) + b"abc", hold=True)  # a truncated frame, then silence
        try:
            start = time.monotonic()
            assert ping(socket_path, read_authkey(key_file), wait_s=5)["pid"] == pid
            assert time.monotonic() - start < 5
        finally:
            silent.close()
        assert proc.poll() is None
        assert "no valid handshake within 1 s" in log.read_text()
    finally:
        proc.kill()
        proc.wait()


def test_terminate_leaves_no_process_and_no_socket(setup):
    proc = setup["proc"]
    _wait_answering(setup["socket"], setup["key"], proc)
    summary = [line for line in setup["log"].read_text().splitlines() if "resident trainer: train done" in line]
    assert summary and "base-model loads so far 1" in summary[-1]
    proc.terminate()
    assert proc.wait(timeout=15) == 128 + signal.SIGTERM
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
    assert not setup["socket"].exists()


def test_supervisor_restarts_a_dead_trainer_and_stops_it(tmp_path):
    from finlora.common.flower_processes import flower_env

    lines: list[str] = []
    trainer = ResidentTrainer(tmp_path / ("long-" * 20), flower_env(tmp_path / "flwr-home", 0), "bank-s",
                              out=lines.append)
    assert str(trainer.socket_path).startswith("/tmp/") and len(str(trainer.socket_path)) < 100  # AF_UNIX limit
    try:
        trainer.start()
        first = trainer.pid
        assert ping(trainer.socket_path, read_authkey(trainer.authkey_file))["pid"] == first
        os.kill(first, signal.SIGKILL)  # the trainer dies while the SuperNode would still run
        deadline = time.monotonic() + 30
        while not any("resident trainer restarted" in line for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.2)
        assert trainer.pid != first and trainer.restarts == 1
        assert ping(trainer.socket_path, read_authkey(trainer.authkey_file))["pid"] == trainer.pid
    finally:
        trainer.stop()
    assert not psutil.pid_exists(trainer.pid) or psutil.Process(trainer.pid).status() == psutil.STATUS_ZOMBIE
    assert not trainer.socket_path.parent.exists()  # the temp socket directory is removed
    assert any("exited with code -9; restarting it" in line for line in lines)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "no-resident"])
def test_finlora_client_starts_and_stops_its_trainer(tmp_path, resident):
    from finlora.common.sample_data import sentiment_rows

    data = tmp_path / "bank.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=20, seed=1)))
    log = tmp_path / "client.log"
    args = ["client", "--insecure", "--superlink", "127.0.0.1:1", "--data", str(data), "--name", "bank-z",
            "--state", str(tmp_path / "state")] + ([] if resident else ["--no-resident"])
    client = subprocess.Popen([sys.executable, "-m", "finlora.simulation.cli", *args], cwd=REPO, env=dict(os.environ),
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (supernode := [p for p in _children(client.pid) if "flower-supernode" in " ".join(p.cmdline())]):
        assert time.monotonic() < deadline and client.poll() is None, log.read_text()[-2000:]
        time.sleep(0.3)
    started = _children(client.pid)
    trainers = [p for p in started if "client.resident" in " ".join(p.cmdline())]
    node_config = supernode[0].cmdline()[supernode[0].cmdline().index("--node-config") + 1]
    if resident:
        assert len(trainers) == 1 and "resident trainer pid" in log.read_text()
        assert f'trainer-socket="{tmp_path}/state/trainer/trainer.sock"' in node_config, node_config
    else:
        assert not trainers and "trainer-" not in node_config, node_config
    client.send_signal(signal.SIGTERM)  # a service manager stopping the institution
    assert client.wait(timeout=30) == 128 + signal.SIGTERM
    _gone, alive = psutil.wait_procs(started, timeout=5)
    assert not alive, [" ".join(p.cmdline()) for p in alive]


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
