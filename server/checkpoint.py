"""A run directory: one PEFT adapter per completed round, ``metrics.jsonl``, and resuming from them.

Layout (the command-line contract)::

    <out>/<run-id>/round-<k>/adapter_config.json
    <out>/<run-id>/round-<k>/adapter_model.safetensors
    <out>/<run-id>/round-<k>/server_optimizer.safetensors   FedAdam/FedYogi moments after round k
    <out>/<run-id>/round-<k>/moe.json, router.safetensors   instead of the adapter, in a router run (moe.experts)
    <out>/<run-id>/run_config.json    the flat run config the run started with (what --resume continues)
    <out>/<run-id>/metrics.jsonl      one JSON object per completed round (round 0 = before training)
    <out>/<run-id>/wire.jsonl         what crossed Flower, per message: keys, shapes, bytes

Every file is replaced atomically, and a round's metrics line is written last, after its adapter and after its
zk ledger and wire lines: a round listed in ``metrics.jsonl`` has everything on disk (that is what ``--resume``
trusts), and the lines of a round a crash cut short are dropped when the run resumes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from finlora.common.adapter import ADAPTER_FILE, CONFIG_FILE, Arrays, read_adapter_dir, save_adapter_dir
from finlora.common.io import atomic_write_bytes, atomic_write_jsonl, atomic_write_text, read_jsonl_records
from finlora.common.moe import MOE_CONFIG, ROUTER_FILE

ROUND_DIR = re.compile(r"^round-(\d+)$")
OPTIMIZER_FILE = "server_optimizer.safetensors"
ROUND_FILES = ((ADAPTER_FILE, CONFIG_FILE), (ROUTER_FILE, MOE_CONFIG))
"""What makes a round directory complete: a PEFT adapter, or a mixture (``moe.experts`` runs)."""


class RunDirectoryError(RuntimeError):
    """The run directory cannot be started or resumed as asked."""


class RunDirectory:
    """Reads and writes one run's directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.wire_path = self.path / "wire.jsonl"
        self.ledger_path = self.path / "ledger.jsonl"
        self.config_path = self.path / "run_config.json"

    def round_dir(self, server_round: int) -> Path:
        return self.path / f"round-{server_round}"

    def completed_rounds(self) -> list[int]:
        """Rounds with both a complete directory (an adapter, or a mixture's router) and a metrics line."""
        logged = {int(r["round"]) for r in read_jsonl_records(self.metrics_path)}
        on_disk = {int(m.group(1)) for d in self.path.glob("round-*")
                   if (m := ROUND_DIR.match(d.name)) and any(all((d / f).is_file() for f in files)
                                                             for files in ROUND_FILES)}
        return sorted(logged & on_disk)

    def start_fresh(self) -> None:
        if self.completed_rounds():
            raise RunDirectoryError(f"{self.path} already holds rounds {self.completed_rounds()}; resume it "
                                    f"(--resume) or choose another run id")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in (self.metrics_path, self.wire_path, self.ledger_path):
            stale.unlink(missing_ok=True)

    def resume_point(self) -> tuple[int, Arrays]:
        """The last completed round and its global adapter; drops log lines of rounds after it."""
        last = self.resume_round()
        return last, read_adapter_dir(self.round_dir(last))

    def resume_round(self) -> int:
        """The last completed round (its directory is ``round_dir(last)``); drops log lines of rounds after it."""
        rounds = self.completed_rounds()
        if not rounds:
            raise RunDirectoryError(f"{self.path}: nothing to resume (no completed round with an adapter and a "
                                    f"metrics line)")
        last = rounds[-1]
        kept = [r for r in read_jsonl_records(self.metrics_path) if int(r["round"]) <= last]
        atomic_write_jsonl(self.metrics_path, kept)
        kept_wire = [r for r in read_jsonl_records(self.wire_path) if int(r["round"]) <= last]
        atomic_write_jsonl(self.wire_path, kept_wire)
        if self.ledger_path.exists():  # zk: rounds after the last saved one were never completed
            kept_ledger = [e for e in read_jsonl_records(self.ledger_path) if int(e.get("round", 0)) <= last]
            atomic_write_jsonl(self.ledger_path, kept_ledger)
        return last

    def save_round(self, server_round: int, arrays: Arrays, peft_config: Any,
                   optimizer_state: Arrays | None = None) -> None:
        """A round's adapter (and server optimizer state); its metrics line comes last (see the module docstring)."""
        save_adapter_dir(arrays, peft_config, self.round_dir(server_round),
                         metadata={"finlora_round": str(server_round)})
        if optimizer_state:
            from safetensors.numpy import save

            atomic_write_bytes(self.round_dir(server_round) / OPTIMIZER_FILE,
                               save({k: np.ascontiguousarray(v) for k, v in optimizer_state.items()}))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One round's metrics line (replacing a line of the same round), written atomically."""
        records = [r for r in read_jsonl_records(self.metrics_path) if int(r["round"]) != int(record["round"])]
        atomic_write_jsonl(self.metrics_path, records + [record])

    def save_config(self, flat: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, json.dumps(flat, indent=2, sort_keys=True) + "\n")

    def saved_config(self) -> dict[str, Any]:
        """The flat run config saved when the run started (empty for runs from before it was saved)."""
        return json.loads(self.config_path.read_text()) if self.config_path.is_file() else {}

    def optimizer_state(self, server_round: int) -> Arrays | None:
        """The server optimizer state saved with a round, if there is one."""
        path = self.round_dir(server_round) / OPTIMIZER_FILE
        if not path.is_file():
            return None
        from safetensors.numpy import load_file

        return load_file(str(path))

    def append_wire(self, entries: list[dict[str, Any]]) -> None:
        if entries:
            atomic_write_jsonl(self.wire_path, read_jsonl_records(self.wire_path) + entries)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl_records(self.metrics_path)
