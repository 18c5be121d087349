"""A newcomer's mistakes end before any Flower, Ray or model process starts, with one line on stderr that names
the cause (flag, file and line, key), a non-zero exit and no traceback (issue: a newcomer's first hour)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from finlora.common.sample_data import sentiment_rows
from tests.conftest import run_cli


def _one_line_error(proc, *expected: str, code: int = 2) -> str:
    """The process failed with ``code`` and said ``expected`` in one stderr line, without a traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith(("  ", "WARNING", "INFO"))]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "SuperLink" not in proc.stdout and "Ray" not in proc.stdout, proc.stdout[-2000:]  # nothing started
    return lines[0]


@pytest.fixture
def bad_jsonl(tmp_path: Path) -> Path:
    rows = [json.dumps(r) for r in sentiment_rows(n=10, seed=1)]
    rows[5] = '{"context": "a row cut in half'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_simulate_input_mistakes_fail_fast_with_one_line(tmp_path, bad_jsonl):
    out = ["--out", str(tmp_path / "runs")]
    _one_line_error(run_cli("simulate", "--data", str(bad_jsonl), *out), f"{bad_jsonl}:6: not valid JSON")
    _one_line_error(run_cli("simulate", "--model", str(tmp_path / "no-such-model"), *out), "--model",
                    "no such file or directory")
    (tmp_path / "empty-model").mkdir()
    _one_line_error(run_cli("simulate", "--model", str(tmp_path / "empty-model"), *out), "holds no config.json")
    _one_line_error(run_cli("simulate", "--model", "nobody/no-such-model-in-cache", *out),
                    "not in the Hugging Face cache")
    _one_line_error(run_cli("simulate", "--data", str(tmp_path / "missing.jsonl"), *out), "no such data file")
    _one_line_error(run_cli("simulate", "--data", str(tmp_path), *out), "a directory; expected a JSONL file")
    _one_line_error(run_cli("simulate", "--set", f"data.dir={tmp_path / 'nowhere'}", *out), "data.dir",
                    "no such directory")
    _one_line_error(run_cli("simulate", "--clients", "0", *out), "--clients 0: must be at least 1")
    _one_line_error(run_cli("simulate", "--rounds", "-1", *out), "--rounds -1: must be at least 1")
    _one_line_error(run_cli("simulate", "--secagg", "--clients", "2", *out), "--secagg needs --clients 3 or more")
    _one_line_error(run_cli("simulate", "--set", "dp.level=samples", *out), "dp.level", "samples")
    (tmp_path / "file").write_text("")
    _one_line_error(run_cli("simulate", "--out", str(tmp_path / "file" / "runs")), "--out", "not writable")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_other_commands_refuse_impossible_counts_and_devices(tmp_path, bad_jsonl):
    _one_line_error(run_cli("data", "split", "--data", str(bad_jsonl), "--clients", "0", "--out", str(tmp_path)),
                    "--clients 0")
    _one_line_error(run_cli("data", "split", "--data", str(bad_jsonl), "--clients", "2", "--out", str(tmp_path)),
                    f"{bad_jsonl}:6")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=10, seed=2)))
    import torch

    if not torch.cuda.is_available():
        _one_line_error(run_cli("client", "--superlink", "127.0.0.1:1", "--insecure", "--data", str(good),
                                "--gpu", "0"), "--gpu 0: this machine has no CUDA device")
    _one_line_error(run_cli("eval", "--model", str(tmp_path / "nonexistent"), "--tasks", "fpb"), "--model",
                    "no such file or directory")
    _one_line_error(run_cli("eval", "--model", "tiny", "--adapter", str(tmp_path), "--tasks", "fpb"), "--adapter",
                    "no adapter_config.json")
    _one_line_error(run_cli("eval", "--model", "tiny", "--adapter", str(tmp_path / "round-9"), "--tasks", "fpb"),
                    "--adapter", "no such adapter directory")


def test_server_names_a_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("server", "--state", str(tmp_path / "state"), "--insecure", "--host", "127.0.0.1", "--port",
                       str(port), timeout=120)
    _one_line_error(proc, f"port {port} on 127.0.0.1 is in use")


def test_audit_tells_a_missing_run_from_one_without_a_ledger(tmp_path):
    (tmp_path / "keys").mkdir()
    missing = run_cli("zk", "audit", str(tmp_path / "nope"), "--keys", str(tmp_path / "keys"))
    assert missing.returncode == 2 and "no such run directory" in missing.stderr, missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("zk", "audit", str(tmp_path / "empty"), "--keys", str(tmp_path / "keys"))
    assert empty.returncode == 2 and "holds no ledger.jsonl" in empty.stderr, empty.stderr


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    """An error that is not the user's input (here: a run directory that is a file) ends in one line too."""
    run = tmp_path / "run"
    run.write_text("not a directory")
    plain = run_cli("simulate", "--resume", str(run))
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "--resume" in plain.stderr, plain.stderr
    debug = run_cli("--debug", "simulate", "--resume", str(run))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_server_checks_its_own_data_before_starting(tmp_path, bad_jsonl):
    proc = run_cli("server", "--state", str(tmp_path / "state"), "--insecure", "--host", "127.0.0.1", "--port", "0",
                   "--heldout-data", str(bad_jsonl), "--config", str(_run_toml(tmp_path)), timeout=120)
    _one_line_error(proc, "--heldout-data", f"{bad_jsonl}:6: not valid JSON")
    proc = run_cli("server", "--state", str(tmp_path / "state"), "--insecure", "--host", "127.0.0.1", "--port", "0",
                   "--eval-data", str(tmp_path / "no-test-dir"), "--config", str(_run_toml(tmp_path)), timeout=120)
    _one_line_error(proc, "--eval-data", "no such directory")


def _run_toml(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text('"eval.every" = 1\n"zk.enabled" = false\n')
    return path


def test_an_institution_starts_a_new_budget_period_with_a_command_and_keeps_the_old_ledger(tmp_path):
    from finlora.client.privacy import FileLedgerStore, PrivacyLedger

    data = tmp_path / "bank-a.jsonl"
    data.write_text(json.dumps(sentiment_rows(n=1, seed=3)[0]) + "\n")
    ledgers = tmp_path / "ledgers"
    spent = PrivacyLedger(target_epsilon=8.0, delta=1e-4, accountant="rdp", noise_multiplier=1.1,
                          history=[(1.1, 0.05, 400)])
    FileLedgerStore(ledgers, str(data)).save(spent)
    shown = run_cli("dp", "ledger", "--data", str(data), "--ledger-dir", str(ledgers))
    assert shown.returncode == 0 and "spent of a budget of 8" in shown.stdout, shown.stdout + shown.stderr
    closed = run_cli("dp", "new-period", "--data", str(data), "--ledger-dir", str(ledgers))
    assert closed.returncode == 0 and "budget period closed" in closed.stdout, closed.stdout + closed.stderr
    (archive,) = ledgers.glob("ledger-*.period-*.json")
    assert json.loads(archive.read_text())["history"] == [[1.1, 0.05, 400]]  # nothing lost
    assert FileLedgerStore(ledgers, str(data)).load() is None
    assert "nothing spent yet" in run_cli("dp", "ledger", "--data", str(data), "--ledger-dir", str(ledgers)).stdout


def test_eval_does_not_try_the_hub_when_it_is_offline_by_default(tmp_path):
    """Like simulate, eval treats the hub as offline unless FINLORA_ONLINE=1: a task without local data is 'no data'
    at once, with no download attempts (it used to retry the hub 5 times per task)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "FINLORA_ONLINE")}
    proc = subprocess.run([sys.executable, "-m", "finlora.simulation.cli", "eval", "--model", "tiny",
                           "--tasks", "fpb,tfns", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                           "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(r["status"] == "no data" and "not found" in r.get("source", json.dumps(r)) for r in results.values())
    assert "huggingface.co" not in proc.stderr and "Retrying" not in proc.stderr, proc.stderr[-3000:]


def test_a_deployed_institutions_refusal_reads_as_one_sentence():
    """What the server prints and records for an institution whose ClientApp refused (Flower wraps the exception
    as "<class 'X'>:<'message'>"): the message, once, with the refusal's name."""
    from finlora.server.strategy import short_reason

    flower = ("<class 'client.privacy.PrivacyBudgetExhausted'>:<'PrivacyBudgetExhausted: privacy budget exhausted: "
              "epsilon spent 7.9772 after 4 steps'>")
    assert short_reason(flower) == ("PrivacyBudgetExhausted: privacy budget exhausted: "
                                    "epsilon spent 7.9772 after 4 steps")


def test_a_killed_client_leaves_no_supernode_behind(tmp_path):
    """SIGKILL gives finlora client no chance to clean up: its SuperNode must still not outlive it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from finlora.common.flower_processes import free_port
    from tests.conftest import REPO

    data = tmp_path / "bank-a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=10, seed=4)))
    client = subprocess.Popen([sys.executable, "-m", "finlora.simulation.cli", "client", "--insecure", "--superlink",
                               f"127.0.0.1:{free_port()}", "--data", str(data), "--name", "bank-a", "--state",
                               str(tmp_path / "node"), "--no-resident", "--app-hash", "any"],
                              cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        supernodes: list[psutil.Process] = []
        while not supernodes and time.monotonic() < deadline:
            supernodes = [p for p in psutil.Process(client.pid).children(recursive=True)
                          if "flower-supernode" in " ".join(p.cmdline())]
            time.sleep(0.5)
        assert supernodes, "no SuperNode started"
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=10)
        gone, alive = psutil.wait_procs(supernodes, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if client.poll() is None:
            client.kill()
