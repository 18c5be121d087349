"""Update validation at the server, on a real TLS + node-auth federation: misbehaving institutions are left out
with their reason, and a round with too few valid updates keeps the previous global adapter."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from finlora.common.adapter import read_adapter_dir
from finlora.common.flower_processes import app_fab_hash, free_port
from finlora.common.sample_data import sentiment_rows
from tests.conftest import REPO, flower_processes, popen_cli, run_cli, stop_all, wait_for_line

BAD = {"x-nan": "holds NaN or infinite values", "x-shape": "has shape (7, 64), expected (8, 64)",
       "x-extra-key": "unexpected ['base_model.model.lm_head.weight']",
       "x-huge-norm": "exceeds strategy.max-update-norm = 8",
       "x-zero-examples": "metric 'num-examples' must be a whole number from 1",
       "x-no-loss": "metric 'train-loss' must be a finite number, got None"}
HONEST = ("bank-a", "bank-b-late-nan")  # the second sends NaN from round 2 on


def make_fault_app(out: Path) -> Path:
    """A separate Flower app whose ClientApp is tests/faulty_client.py (finlora itself comes from the installed
    ``finlora`` package, as in any FAB of ours); the ServerApp stays finlora's."""
    out.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "faulty_client.py", out / "faulty_client.py")
    pyproject = (REPO / "pyproject.toml").read_text()
    faulty = pyproject.replace('clientapp = "finlora.client.app:app"', 'clientapp = "faulty_client:app"')
    assert faulty != pyproject, "pyproject.toml no longer names finlora.client.app:app as the ClientApp"
    (out / "pyproject.toml").write_text(faulty)
    return out


def test_misbehaving_institutions_are_excluded_and_a_short_round_keeps_the_adapter(tmp_path):
    before = flower_processes()
    assert run_cli("certs", "init", "--out", str(tmp_path / "certs"), "--server-name", "localhost,127.0.0.1"
                   ).returncode == 0
    for name in (*HONEST, *BAD):
        assert run_cli("certs", "node", "--out", str(tmp_path / "nodes"), "--name", name).returncode == 0
    for i, name in enumerate(HONEST):
        rows = sentiment_rows(n=120, seed=20 + i)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    app = make_fault_app(tmp_path / "app")
    (tmp_path / "run.toml").write_text(
        'num-rounds = 2\n"strategy.min-available-nodes" = 8\n"strategy.min-train-nodes" = 2\n'
        '"strategy.fraction-evaluate" = 0.0\n"strategy.round-timeout" = 300.0\n"zk.enabled" = false\n'
        '"dp.enabled" = false\n"eval.every" = 0\n"train.local-steps" = 8\n')
    port = free_port()
    app_hash = app_fab_hash(app)  # the institutions pin the operator's published app (not their own finlora's)
    server = popen_cli("server", "--state", str(tmp_path / "state"), "--config", str(tmp_path / "run.toml"),
                       "--certs", str(tmp_path / "certs"), "--nodes", str(tmp_path / "nodes"), "--app", str(app),
                       "--host", "127.0.0.1", "--port", str(port), log=tmp_path / "server.log")
    clients = []
    try:
        wait_for_line(tmp_path / "server.log", "waiting for institutions", server)
        for name in (*HONEST, *BAD):
            data = tmp_path / f"{name if name in HONEST else HONEST[0]}.jsonl"
            # the bad ones never train: no resident trainer importing torch for nothing on a 2-core machine
            light = [] if name in HONEST else ["--no-resident"]
            clients.append(popen_cli("client", "--superlink", f"127.0.0.1:{port}", "--ca",
                                     str(tmp_path / "certs" / "ca.crt"), "--key",
                                     str(tmp_path / "nodes" / f"{name}.auth.key"), "--data", str(data),
                                     "--max-wait-time", "20", "--allow-no-dp", "--app-hash", app_hash,
                                     *light, log=tmp_path / f"{name}.log"))
        assert server.wait(timeout=900) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop_all(server, *clients)
    time.sleep(2)
    assert not flower_processes() - before, "SuperLink/SuperNode processes were left behind"

    run_dir = tmp_path / "state" / "runs" / "federation"
    metrics = {m["round"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    first, second = metrics[1], metrics[2]
    # round 1: the two honest institutions are aggregated, each bad reply is excluded with its own reason
    assert first["num_clients"] == 2 and not first["kept_previous"]
    assert len(first["rejected"]) == len(BAD)
    for reason in BAD.values():
        assert sum(reason in r for r in first["rejected"].values()) == 1, (reason, first["rejected"])
    assert metrics[1]["heldout_loss"] < metrics[0]["heldout_loss"]
    # round 2: one valid update is fewer than min-train-nodes = 2, so the round-1 adapter stays the global one
    assert len(second["rejected"]) == len(BAD) + 1 and "fewer than strategy.min-train-nodes = 2" in second["kept_previous"]
    kept, previous = read_adapter_dir(run_dir / "round-2"), read_adapter_dir(run_dir / "round-1")
    assert all(np.array_equal(kept[k], previous[k]) for k in previous)
    assert second["heldout_loss"] == first["heldout_loss"]
    assert "rejected the update of node" in (tmp_path / "server.log").read_text()
