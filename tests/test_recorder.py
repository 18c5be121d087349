"""The recorder's write order (server/recorder.py): a round counts as done (its ``metrics.jsonl`` line, what
``--resume`` trusts) only once its adapter, its zk ledger line and its wire log are on disk, so a server killed
between two of these writes loses no ledger entry of a round it counts as done, and leaves no line of a round it
does not count.

Found by the TLS crash test (tests/test_deployment.py): killed once round 1 was in ``metrics.jsonl``, the server
had not yet written round 1's ledger line, and the resumed run's audit failed with "expected round 1"."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from finlora.common.adapter import initial_adapter
from finlora.common.config import load_config
from finlora.common.io import read_jsonl_records
from finlora.common.model import lora_config, lora_shapes, resolve_model_path
from finlora.server.checkpoint import RunDirectory
from finlora.server.recorder import RoundRecorder
from finlora.server.strategy import RoundOutcome
from finlora.server.zk_round import ZkLedger
from finlora.zk.signing import generate_key


class Killed(RuntimeError):
    """The server process dies here."""


def _kept_round(server_round: int) -> RoundOutcome:
    wire = ({"round": server_round, "direction": "client->server", "message_type": "train"},)
    return RoundOutcome(round=server_round, started=time.time(), clients={}, rejected={"7": "bad-proof"}, errors={},
                        wire=wire, aggregated=False, aggregate_seconds=0.0, client_eval={}, eval_rejected={}, zk=None,
                        kept_previous="fewer than strategy.min-train-nodes = 1 valid updates")


def _recorder(path: Path) -> RoundRecorder:
    cfg = load_config({"eval.every": 0, "eval.heldout": False})
    run_dir = RunDirectory(path)
    ledger = ZkLedger(cfg.zk, "run-1", path, {"institution-0": generate_key().public_key()})
    return RoundRecorder(cfg, run_dir, lora_config(cfg.lora, resolve_model_path(cfg.model.name)), "examples",
                         ledger=ledger)


def test_a_round_is_listed_as_done_only_after_its_ledger_and_wire_lines(tmp_path, monkeypatch):
    recorder = _recorder(tmp_path)
    cfg = recorder.cfg
    adapter = initial_adapter(lora_shapes(cfg.model, cfg.lora), seed=0)
    recorder.record(0, adapter, None)

    def metrics_written_last(record: dict) -> None:
        ledger_rounds = [e.get("round") for e in read_jsonl_records(tmp_path / "ledger.jsonl")]
        wire_rounds = [w["round"] for w in read_jsonl_records(tmp_path / "wire.jsonl")]
        assert record["round"] in ledger_rounds and record["round"] in wire_rounds
        raise Killed  # the process dies just before the round would count as done

    monkeypatch.setattr(recorder.run_dir, "append_metrics", metrics_written_last)
    with pytest.raises(Killed):
        recorder.record(1, adapter, _kept_round(1))
    monkeypatch.undo()

    # the restarted server resumes from round 0 and drops the cut-short round's lines; redoing it writes each once
    assert RunDirectory(tmp_path).resume_round() == 0
    assert [e.get("round") for e in read_jsonl_records(tmp_path / "ledger.jsonl")] == [None]  # the header
    assert read_jsonl_records(tmp_path / "wire.jsonl") == []
    again = _recorder(tmp_path)
    again.record(1, adapter, _kept_round(1))
    assert [e.get("round") for e in read_jsonl_records(tmp_path / "ledger.jsonl")] == [None, 1]
    assert [w["round"] for w in read_jsonl_records(tmp_path / "wire.jsonl")] == [1]
    assert [m["round"] for m in read_jsonl_records(tmp_path / "metrics.jsonl")] == [0, 1]
