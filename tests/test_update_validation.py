"""Update validation at the server, through the real server path (a Flower simulation: the checks are the
ServerApp's, whatever carried the replies; TLS and node auth have their own tests in test_deployment.py):
misbehaving institutions are left out with their reason, and a round with too few valid updates keeps the previous
global adapter."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from finlora.common.adapter import read_adapter_dir
from tests.conftest import REPO, flower_processes, run_cli

BAD = {"x-nan": "holds NaN or infinite values", "x-shape": "has shape (7, 64), expected (8, 64)",
       "x-extra-key": "unexpected ['base_model.model.lm_head.weight']",
       "x-huge-norm": "exceeds strategy.max-update-norm = 8",
       "x-zero-examples": "metric 'num-examples' must be a whole number from 1",
       "x-no-loss": "metric 'train-loss' must be a finite number, got None"}
HONEST = ("institution-0", "institution-1")  # the second sends NaN from round 2 on (PLAN below)
PLAN = {"institution-1": "late-nan", **{f"institution-{i}": fault.removeprefix("x-")
                                       for i, fault in enumerate(BAD, start=2)}}


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
    app = make_fault_app(tmp_path / "app")
    (app / "fault_plan.py").write_text(f"PLAN = {PLAN!r}\n")
    proc = run_cli("simulate", "--app", str(app), "--clients", str(len(PLAN) + 1), "--rounds", "2",
                   "--out", str(tmp_path), "--run-id", "faults", "--set", "strategy.min-train-nodes=2",
                   "--set", "strategy.fraction-evaluate=0.0", "--set", "zk.enabled=false", "--set", "dp.enabled=false",
                   "--set", "eval.every=0", "--set", "train.local-steps=8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    time.sleep(2)
    assert not flower_processes() - before, "SuperLink/Ray processes were left behind"

    run_dir = tmp_path / "faults"
    metrics = {m["round"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    first, second = metrics[1], metrics[2]
    # round 1: the two honest institutions are aggregated, each bad reply is excluded with its own reason
    assert first["num_clients"] == 2 and not first["kept_previous"]
    assert len(first["rejected"]) == len(BAD)
    for reason in BAD.values():
        assert sum(reason in r for r in first["rejected"].values()) == 1, (reason, first["rejected"])
    assert metrics[1]["heldout_loss"] < metrics[0]["heldout_loss"]
    # round 2: one valid update is fewer than min-train-nodes = 2, so the round-1 adapter stays the global one
    assert len(second["rejected"]) == len(BAD) + 1
    assert "fewer than strategy.min-train-nodes = 2" in second["kept_previous"]
    kept, previous = read_adapter_dir(run_dir / "round-2"), read_adapter_dir(run_dir / "round-1")
    assert all(np.array_equal(kept[k], previous[k]) for k in previous)
    assert second["heldout_loss"] == first["heldout_loss"]
    assert "rejected the update of node" in proc.stdout
