"""A ClientApp for the update-validation tests: honest finlora clients, and misbehaving ones picked by name.

The test copies this file next to finlora's packages as a top-level module of a separate Flower app (it is
never part of finlora's own app). An institution whose name ends in ``-<fault>`` sends, instead of a trained
update, the global adapter it received made bad in that way; ``late-nan`` is honest in round 1 and sends NaN
from round 2 on. A simulation names its institutions ``institution-<partition>``, so a test can also write
``fault_plan.py`` (``PLAN = {institution: fault}``) beside this file. The zk faults (``bad-proof``: one byte of the
zero-knowledge proof flipped; ``no-proof``) train honestly and break only the proof. Every other institution runs
finlora's real ClientApp code.

Secure aggregation (``zk.secagg``): ``SECAGG_PLAN = {(institution, round): fault}`` in ``fault_plan.py`` makes an
institution mask another vector than the one it committed to (``mismatch``) or vanish after sending its masked
update (``drop-after-mask``: it fails every later stage of that round). With ``SPY_DIR`` set there, every
institution also writes each reply it sends (what the server receives) and, for the test's eyes only, the
plaintext update it committed to.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from finlora.client.app import evaluate as honest_evaluate
from finlora.client.app import secagg as honest_secagg
from finlora.client.app import train as honest_train
from finlora.client.secagg_stage import STATE_RECORD, VALUES_RECORD
from finlora.client.zk_update import institution_name
from finlora.common.adapter import from_array_record, to_array_record
from finlora.zk.codec import PROOF, ZK_RECORD
from finlora.zk.secagg_codec import MASK, SECAGG_RECORD, SIGN, STAGE, UNMASK

try:
    from fault_plan import PLAN  # written beside this file by a test: institution name -> fault
except ImportError:
    PLAN: dict[str, str] = {}
try:
    from fault_plan import SECAGG_PLAN  # (institution, round) -> "mismatch" | "drop-after-mask"
except ImportError:
    SECAGG_PLAN: dict[tuple[str, int], str] = {}
try:
    from fault_plan import SPY_DIR  # where every reply (and the plaintext update) is written
except ImportError:
    SPY_DIR = ""

FAULTS = ("nan", "shape", "extra-key", "huge-norm", "zero-examples", "no-loss", "late-nan")
ZK_FAULTS = ("bad-proof", "no-proof")

app = ClientApp()


def fault_of(context: Context) -> str:
    name = institution_name(context.node_config)
    if name in PLAN:
        return PLAN[name]
    return next((f for f in sorted(FAULTS, key=len, reverse=True) if name.endswith(f"-{f}")), "")


def bad_update(fault: str, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """(arrays, num-examples) of a reply broken in the named way."""
    first = sorted(arrays)[0]
    arrays = {k: v.copy() for k, v in arrays.items()}
    examples = 50
    if fault in ("nan", "late-nan"):
        arrays[first][0, 0] = np.nan
    elif fault == "shape":
        arrays[first] = arrays[first][:-1]
    elif fault == "extra-key":
        arrays["base_model.model.lm_head.weight"] = np.zeros((4, 4), np.float32)
    elif fault == "huge-norm":
        arrays[first] = arrays[first] + 1000.0
    elif fault == "zero-examples":
        examples = 0
    return arrays, examples


@app.train()
def train(msg: Message, context: Context) -> Message:
    fault = fault_of(context)
    server_round = int(msg.content["config"]["server-round"])
    if fault in ZK_FAULTS:
        reply = honest_train(msg, context)
        zk = reply.content[ZK_RECORD]
        proof = bytearray(zk[PROOF])
        if fault == "bad-proof":
            proof[len(proof) // 2] ^= 0x01
        zk[PROOF] = bytes(proof) if fault == "bad-proof" else b""
        return reply
    if not fault or (fault == "late-nan" and server_round < 2):
        reply = honest_train(msg, context)
        spy(context, server_round, "train", reply.content)
        return reply
    arrays, examples = bad_update(fault, from_array_record(msg.content["arrays"]))
    # no-loss: a metric key the others send is missing (Flower's consistency check used to fail the whole run)
    metrics = MetricRecord({"num-examples": examples} if fault == "no-loss" else
                           {"num-examples": examples, "train-loss": 0.0})
    return Message(RecordDict({"arrays": to_array_record(arrays), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest_evaluate(msg, context)


def spy(context: Context, server_round: int, kind: str, content: RecordDict) -> None:
    """Append what this institution sends to ``SPY_DIR/<institution>.jsonl`` (bytes as hex, arrays as lists); after
    training with secure aggregation, also the plaintext update it committed to (``<institution>-<round>.npy``)."""
    if not SPY_DIR:
        return
    name = institution_name(context.node_config)
    out = Path(SPY_DIR)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "train" and VALUES_RECORD in context.state:
        np.save(out / f"{name}-{server_round}.npy", context.state[VALUES_RECORD]["values"].numpy())
    records = {rname: {k: (bytes(v).hex() if isinstance(v, bytes) else v) for k, v in rec.items()}
               for rname, rec in content.config_records.items()}
    arrays = {rname: {k: rec[k].numpy().tolist() for k in rec.keys()} for rname, rec in content.array_records.items()}
    with open(out / f"{name}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"round": server_round, "kind": kind, "config": records, "arrays": arrays}) + "\n")


@app.query("secagg")
def secagg(msg: Message, context: Context) -> Message:
    name = institution_name(context.node_config)
    server_round = int(context.state[STATE_RECORD]["round"]) if STATE_RECORD in context.state else -1
    fault = SECAGG_PLAN.get((name, server_round), "")
    stage = msg.content[SECAGG_RECORD][STAGE]
    if fault == "mismatch" and stage == MASK:
        values = context.state[VALUES_RECORD]["values"].numpy().copy()
        values[:50] = 0  # not the update it committed to and proved
        context.state[VALUES_RECORD] = ArrayRecord({"values": Array(values)})
    if fault == "drop-after-mask" and stage in (SIGN, UNMASK):
        raise ConnectionError(f"{name} is gone")
    reply = honest_secagg(msg, context)
    spy(context, server_round, f"query.{stage}", reply.content)
    return reply
