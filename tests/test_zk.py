"""The commitment layer (zk/): encoding, Pedersen/Hyrax commitments, verification, ledger and audit.

Small vectors (2 rows of 1,024 values plus a ragged third row of 904: 2,952 values, ``N_VALUES``; a vector of up
to 65,536 values has rows of 1,024, see ``commit.row_size``); the whole file runs in seconds.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from py_arkworks_bls12381 import G1Point
from safetensors.numpy import load_file, save_file

from finlora.zk import signing
from finlora.zk.audit import audit_run
from finlora.zk.cli import main as zk_main
from finlora.zk.commit import (GROUP_ORDER, ROW_RULE, SMALL_LENGTH_MAX, SMALL_ROW_SIZE, commit_row_points,
                               commit_rows, commitments_digest, decode_points, num_rows, random_blindings, rows_of)
from finlora.zk.encoding import Layout, apply_aggregate, dequantize, in_range, norm_within, quantize_update
from finlora.zk.generators import PINNED_DIGEST, ROW_SIZE, derive_generators, generators, generators_digest
from finlora.zk.ledger import (adapter_relpath, append_entry, file_sha256, header_entry, read_ledger, record_kept_round,
                               record_round, save_aggregate, seen_digests)
from finlora.zk.verify import (BAD_POINT, BAD_SIGNATURE, DUPLICATE, NORM_BOUND, OPENING, OUT_OF_RANGE, REPLAY,
                               UNKNOWN_NODE, Submission, aggregate, make_submission, verify_round)
from finlora.zk.wire import pack_blindings, unpack_blindings, unpack_commitments

REPO = Path(__file__).resolve().parent.parent
RUN_ID = "zk-test"
BOUND, FRAC, BITS = 1.0, 10, 8
N_VALUES = 2 * SMALL_ROW_SIZE + 904  # three rows of row_size(N_VALUES) = 1,024, the last one ragged


@pytest.fixture(scope="module")
def keys() -> dict[str, signing.Ed25519PrivateKey]:
    return {f"inst-{i}": signing.generate_key() for i in range(12)}


def _publics(keys: dict) -> dict:
    return {name: key.public_key() for name, key in keys.items()}


def _values(rng: np.random.Generator, n: int = N_VALUES, scale: float = 0.005) -> np.ndarray:
    return quantize_update({"w": rng.normal(0, scale, n)}, BOUND, FRAC, BITS, rng)[0]


def _sign(key, node: str, commitments, n: int, round_num: int = 2, run_id: str = RUN_ID) -> bytes:
    return signing.sign(key, signing.update_statement(run_id, round_num, node, commitments_digest(commitments), n))


# --- generators and commitments ---------------------------------------------------------------------------

def test_generators_are_deterministic_and_match_the_pinned_digest() -> None:
    gens, h = derive_generators()
    assert generators_digest(gens, h) == PINNED_DIGEST
    cached, cached_h = generators()
    assert cached == gens and cached_h == h and len(gens) == ROW_SIZE
    assert len({g.to_compressed_bytes() for g in (*gens, h)}) == ROW_SIZE + 1


def test_commitments_are_additively_homomorphic_with_negatives_and_a_ragged_row() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(-127, 128, N_VALUES)
    y = rng.integers(-32767, 32768, N_VALUES)
    cx, rx = commit_rows(x)
    cy, ry = commit_rows(y)
    assert len(cx) == 3 and all(len(c) == 48 for c in cx)
    summed = commit_row_points(x + y, [(a + b) % GROUP_ORDER for a, b in zip(rx, ry)])
    assert [a + b for a, b in zip(decode_points(cx), decode_points(cy))] == summed
    assert commit_rows(x, rx)[0] == cx  # deterministic given the blindings
    assert commit_rows(x)[0] != cx  # fresh blindings hide the same vector


def test_rows_are_1024_values_up_to_65536_and_4096_above() -> None:
    """The public length fixes the row size (commit.row_size): a small update's proof runs over rows of 1,024, a
    large one keeps its row commitments few with rows of 4,096. A row of 1,024 is committed with the first 1,024
    pinned generators, so the commitment of a short row is the same either way."""
    assert num_rows(SMALL_LENGTH_MAX) == SMALL_LENGTH_MAX // SMALL_ROW_SIZE == 64
    assert num_rows(SMALL_LENGTH_MAX + 1) == 17
    assert rows_of(np.ones(SMALL_LENGTH_MAX + 1, np.int64)).shape == (17, ROW_SIZE)
    assert rows_of(np.ones(1500, np.int64)).shape == (2, SMALL_ROW_SIZE)
    x = np.arange(1, 1001, dtype=np.int64)
    long_row = np.zeros(SMALL_LENGTH_MAX + 1, np.int64)
    long_row[:1000] = x
    assert commit_rows(x, [7])[0][0] == commit_rows(long_row, [7] + [0] * 16)[0][0]


# --- encoding -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,frac,bound,scale", [(8, 10, 1.0, 0.05), (16, 12, 2.0, 0.5), (8, 4, 0.5, 1.0),
                                                    (8, 6, 0.3, 0.004)])
def test_quantization_respects_the_int_range_and_the_norm_bound(bits: int, frac: int, bound: float,
                                                                scale: float) -> None:
    rng = np.random.default_rng(bits + frac)
    delta = {"b.lora_B": rng.normal(0, scale, (40, 50)), "a.lora_B": rng.normal(0, scale, (30, 33))}
    q, layout = quantize_update(delta, bound, frac, bits, rng)
    assert layout.keys == ("a.lora_B", "b.lora_B") and q.shape == (layout.size,) and q.dtype == np.int64
    assert int(np.max(np.abs(q))) <= (1 << (bits - 1)) - 1
    assert norm_within(q, bound, frac)
    assert float(np.linalg.norm(q)) <= bound * 2 ** frac
    assert dequantize(q, layout, frac)["b.lora_B"].shape == (40, 50)


def test_range_check_does_not_wrap_at_the_dtype_minimum() -> None:
    assert not in_range(np.array([0, np.iinfo(np.int64).min]), 16)
    assert not in_range(np.array([-128], np.int8), 8) and in_range(np.array([-127, 127], np.int8), 8)


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(1)
    value = rng.uniform(-0.1, 0.1, 64)
    draws = np.stack([quantize_update({"w": value}, 10.0, 6, 8, rng)[0] for _ in range(4000)])
    mean = draws.mean(axis=0) / 2 ** 6
    assert np.max(np.abs(mean - value)) < 4 * 0.5 / 2 ** 6 / np.sqrt(4000)


def test_apply_aggregate_touches_only_layout_keys() -> None:
    prev = {"m.lora_A": np.ones((2, 3), np.float32), "m.lora_B": np.zeros((3, 2), np.float32)}
    layout = Layout.from_tensors({"m.lora_B": prev["m.lora_B"]})
    new = apply_aggregate(prev, np.arange(6, dtype=np.int64) * 4, layout, 2, 2)
    assert new["m.lora_A"].tobytes() == prev["m.lora_A"].tobytes()
    assert new["m.lora_B"].dtype == np.float32 and new["m.lora_B"].reshape(-1).tolist() == [0, .5, 1, 1.5, 2, 2.5]
    assert Layout.from_json(json.loads(json.dumps(layout.to_json()))) == layout


# --- signatures, keys and wire format -------------------------------------------------------------------

def test_keys_round_trip_through_files_and_the_registry(tmp_path: Path, keys: dict) -> None:
    key = keys["inst-0"]
    signing.save_private_key(key, tmp_path / "inst-0.pem")
    signing.save_public_key(key, tmp_path / "reg" / "inst-0.pub.pem")
    (tmp_path / "raw.key").write_bytes(signing.public_key_raw(keys["inst-1"]))
    (tmp_path / "reg.json").write_text(json.dumps({"inst-1": "raw.key", "inst-0": "reg/inst-0.pub.pem"}))
    assert (tmp_path / "inst-0.pem").stat().st_mode & 0o077 == 0
    loaded = signing.load_private_key(tmp_path / "inst-0.pem")
    statement = signing.update_statement("r", 1, "inst-0", bytes(32), 7)
    from_dir = signing.load_key_registry(tmp_path / "reg")
    from_json = signing.load_key_registry(tmp_path / "reg.json")
    assert signing.verify(from_dir["inst-0"], statement, signing.sign(loaded, statement))
    assert signing.verify(from_json["inst-1"], statement, signing.sign(keys["inst-1"], statement))
    assert not signing.verify(from_json["inst-0"], statement, signing.sign(keys["inst-1"], statement))
    # every field is bound: changing any one changes the statement
    variants = {signing.update_statement(*args) for args in [("r", 1, "inst-0", bytes(32), 7), ("r", 2, "inst-0",
                bytes(32), 7), ("r1", 1, "inst-0", bytes(32), 7), ("r", 1, "inst-01", bytes(32), 7),
                ("r", 1, "inst-0", bytes(31) + b"\1", 7), ("r", 1, "inst-0", bytes(32), 8)]}
    assert len(variants) == 6


def test_submission_survives_the_wire(keys: dict) -> None:
    rng = np.random.default_rng(2)
    sub = make_submission(_values(rng), 11, keys["inst-0"], RUN_ID, 2, "inst-0")
    wire = sub.to_wire(BITS)
    assert wire["values"].dtype == np.int8 and len(wire["blindings"]) == 32 * 3
    back = Submission.from_wire("inst-0", wire)
    # per-key int arrays, as they travel in an ArrayRecord
    layout = Layout((("a", (2, 1000)), ("b", (N_VALUES - 2000,))))
    per_key = {"a": wire["values"][:2000].reshape(2, 1000), "b": wire["values"][2000:]}
    assert np.array_equal(Submission.from_wire("inst-0", {**wire, "values": layout.flatten(per_key)}).values,
                          sub.values)
    assert np.array_equal(back.values, sub.values) and back.blindings == sub.blindings
    assert back.commitments == sub.commitments and back.signature == sub.signature
    assert unpack_blindings(pack_blindings(sub.blindings)) == list(sub.blindings)
    with pytest.raises(ValueError):
        Submission.from_wire("inst-0", {**wire, "commitments": wire["commitments"][:-1]})


# --- server verification --------------------------------------------------------------------------------

def _not_in_subgroup() -> bytes:
    """A point on y^2 = x^3 + 4 outside the prime-order subgroup, compressed."""
    p = 0x1A0111EA397FE69A4B1BA7B6434BACD764774B84F38512BF6730D2A0F6B0F6241EABFFFEB153FFFFB9FEFFFFFFFFAAAB
    x = 1
    while True:
        a = (x ** 3 + 4) % p
        y = pow(a, (p + 1) // 4, p)
        if y * y % p == a:
            point = G1Point.from_xy_bytes_unchecked_be(x.to_bytes(48, "big") + y.to_bytes(48, "big"))
            if not point.is_in_subgroup():
                return point.to_compressed_bytes()
        x += 1


def _not_on_curve() -> bytes:
    p = 0x1A0111EA397FE69A4B1BA7B6434BACD764774B84F38512BF6730D2A0F6B0F6241EABFFFEB153FFFFB9FEFFFFFFFFAAAB
    x = 1
    while pow((x ** 3 + 4) % p, (p - 1) // 2, p) == 1:
        x += 1
    raw = bytearray(x.to_bytes(48, "big"))
    raw[0] |= 0x80  # compressed flag
    return bytes(raw)


def _resigned(sub: Submission, key, **changes) -> Submission:
    fields = {f: getattr(sub, f) for f in ("node_id", "num_examples", "values", "blindings", "commitments")}
    fields.update(changes)
    return Submission(**fields, signature=_sign(key, fields["node_id"], fields["commitments"],
                                               fields["num_examples"]))


def test_each_tampered_update_is_rejected_with_its_reason_and_the_rest_aggregated(keys: dict) -> None:
    rng = np.random.default_rng(3)
    k = keys
    honest = [make_submission(_values(rng), 10 + i, k[f"inst-{i}"], RUN_ID, 2, f"inst-{i}") for i in range(3)]
    earlier = make_submission(_values(rng), 5, k["inst-3"], RUN_ID, 1, "inst-3")
    seen = {earlier.digest}

    value_changed = make_submission(_values(rng), 9, k["inst-4"], RUN_ID, 2, "inst-4")
    value_changed = Submission("inst-4", 9, np.where(np.arange(N_VALUES) == 7, value_changed.values + 1,
                                                     value_changed.values), value_changed.blindings,
                               value_changed.commitments, value_changed.signature)
    stolen = _resigned(honest[1], k["inst-5"], node_id="inst-5", values=_values(rng))
    replayed = earlier  # a round-1 update sent again in round 2
    bad_sig = make_submission(_values(rng), 9, k["inst-6"], RUN_ID, 2, "inst-6")
    bad_sig = Submission("inst-6", 99, bad_sig.values, bad_sig.blindings, bad_sig.commitments, bad_sig.signature)
    own = make_submission(_values(rng), 9, k["inst-7"], RUN_ID, 2, "inst-7")
    off_subgroup = _resigned(own, k["inst-7"], commitments=(_not_in_subgroup(), *own.commitments[1:]))
    own = make_submission(_values(rng), 9, k["inst-8"], RUN_ID, 2, "inst-8")
    off_curve = _resigned(own, k["inst-8"], commitments=(*own.commitments[:2], _not_on_curve()))
    too_big = make_submission(np.full(N_VALUES, -50, np.int64), 9, k["inst-9"], RUN_ID, 2, "inst-9")  # L2 > bound
    wide = np.zeros(N_VALUES, np.int64)
    wide[0] = 200
    out_of_range = make_submission(wide, 9, k["inst-10"], RUN_ID, 2, "inst-10")
    copied = _resigned(honest[2], k["inst-11"], node_id="inst-11")  # full opening of inst-2, own signature
    stranger = make_submission(_values(rng), 9, k["inst-0"], RUN_ID, 2, "nobody")

    subs = [honest[0], value_changed, stolen, honest[1], replayed, bad_sig, off_subgroup, off_curve, too_big,
            out_of_range, honest[2], copied, stranger]
    accepted, rejected = verify_round(subs, RUN_ID, 2, _publics(keys), BOUND, FRAC, BITS, seen,
                                      expected_size=N_VALUES)
    codes = {node: reason.split(":")[0] for node, reason in rejected.items()}
    assert codes == {"inst-4": OPENING, "inst-5": OPENING, "inst-3": REPLAY, "inst-6": BAD_SIGNATURE,
                     "inst-7": BAD_POINT, "inst-8": BAD_POINT, "inst-9": NORM_BOUND, "inst-10": OUT_OF_RANGE,
                     "inst-11": DUPLICATE, "nobody": UNKNOWN_NODE}
    assert [s.node_id for s in accepted] == ["inst-0", "inst-1", "inst-2"]
    total, blindings, weight = aggregate(accepted)
    assert weight == 33 and np.array_equal(total, sum(s.num_examples * s.values for s in honest))
    assert commit_row_points(total, blindings) == [
        sum((p * _scalar(s.num_examples) for s, p in ((s, decode_points(s.commitments)[r]) for s in honest)),
            G1Point.identity()) for r in range(3)]


def _scalar(n: int):
    from py_arkworks_bls12381 import Scalar
    return Scalar(n)


def test_honest_round_passes_batched_and_a_replayed_signature_fails(keys: dict) -> None:
    rng = np.random.default_rng(4)
    subs = [make_submission(_values(rng), 3, keys[f"inst-{i}"], RUN_ID, 1, f"inst-{i}") for i in range(3)]
    accepted, rejected = verify_round(subs, RUN_ID, 1, _publics(keys), BOUND, FRAC, BITS)
    assert len(accepted) == 3 and not rejected
    # the same submissions presented in round 2 (not yet in seen_digests): the signature binds the round
    accepted, rejected = verify_round(subs, RUN_ID, 2, _publics(keys), BOUND, FRAC, BITS)
    assert not accepted and {r.split(":")[0] for r in rejected.values()} == {BAD_SIGNATURE}


# --- ledger and audit -----------------------------------------------------------------------------------

MODULES = [f"base_model.model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"][:3]


def _adapter0(rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for m in MODULES:
        out[f"{m}.lora_A.weight"] = rng.normal(0, 0.1, (8, 64)).astype(np.float32)
        out[f"{m}.lora_B.weight"] = np.zeros((200, 8), np.float32)
    return out


def _save_adapter(run_dir: Path, round_num: int, tensors: dict[str, np.ndarray]) -> Path:
    path = run_dir / adapter_relpath(round_num)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, keys: dict) -> Path:
    """3 clients x 2 rounds, FFA style (only lora_B in the update), built with the zk functions end to end."""
    run = tmp_path_factory.mktemp("runs") / RUN_ID
    rng = np.random.default_rng(5)
    clients = {f"inst-{i}": (keys[f"inst-{i}"], 20 + 7 * i) for i in range(3)}
    global_ = _adapter0(rng)
    path0 = _save_adapter(run, 0, global_)
    append_entry(run, header_entry(RUN_ID, {n: k.public_key() for n, (k, _) in clients.items()},
                                   file_sha256(path0), BOUND, FRAC, BITS))
    for name, (key, _) in clients.items():  # what the institutions publish (the audit's --keys)
        signing.save_public_key(key.public_key(), run / "keys" / f"{name}{signing.PUBLIC_SUFFIX}")
    seen: set[bytes] = set()
    for rnd in (1, 2):
        subs = []
        for node, (key, n) in clients.items():
            delta = {k: rng.normal(0, 0.005, v.shape) for k, v in global_.items() if "lora_B" in k}
            values, layout = quantize_update(delta, BOUND, FRAC, BITS, rng)
            subs.append(make_submission(values, n, key, RUN_ID, rnd, node))
        accepted, rejected = verify_round(subs, RUN_ID, rnd, {n: k.public_key() for n, (k, _) in clients.items()},
                                          BOUND, FRAC, BITS, seen, expected_size=layout.size)
        assert len(accepted) == 3, rejected
        seen.update(s.digest for s in accepted)
        total, blindings, weight = aggregate(accepted)
        global_ = apply_aggregate(global_, total, layout, weight, FRAC)
        _save_adapter(run, rnd, global_)
        record_round(run, rnd, layout, accepted, rejected, total, blindings, weight)
        assert seen_digests(run) == seen
    return run


def _nudge_first_lora_b(path: Path, index: int, delta: float) -> None:
    """Change one value of a saved global adapter (what a dishonest server might do)."""
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key].reshape(-1)[index] += np.float32(delta)
    save_file(tensors, str(path))


def _tampered(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / RUN_ID
    shutil.copytree(run_dir, copy)
    return copy


def _published(run: Path) -> dict:
    """The institutions' own public keys (from outside the ledger)."""
    return signing.load_key_registry(run / "keys")


def _audit(run: Path) -> list:
    return audit_run(run, _published(run))


def _failed_rounds(run: Path) -> list[int]:
    return [v.round for v in _audit(run) if not v.ok]


def _rewrite_round(run: Path, rnd: int, total: np.ndarray, blindings: list[int], weight: int) -> None:
    """What a cheating server would do: a new aggregate, a consistent adapter, and ledger hashes to match."""
    entries = read_ledger(run)
    entry = entries[rnd]
    layout = Layout.from_json(entry["layout"])
    prev = load_file(str(run / adapter_relpath(rnd - 1)))
    path = _save_adapter(run, rnd, apply_aggregate(prev, total, layout, weight, FRAC))
    entry["aggregate_file"], entry["aggregate_sha256"] = save_aggregate(run, rnd, total)
    entry["aggregate_blindings"] = base64.b64encode(pack_blindings(blindings)).decode()
    entry["total_weight"], entry["adapter_sha256"] = weight, file_sha256(path)
    (run / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_audit_passes_on_an_honest_run(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    verdicts = _audit(run_dir)
    assert [(v.round, v.ok, v.clients) for v in verdicts] == [(0, True, 0), (1, True, 3), (2, True, 3)]
    assert zk_main(["audit", str(run_dir), "--keys", str(run_dir / "keys")]) == 0
    assert "audit OK" in capsys.readouterr().out
    entry = read_ledger(run_dir)[1]
    assert all("values" not in c and "blindings" not in c for c in entry["clients"])
    assert [k for k, _ in entry["layout"]] == sorted(k for k in load_file(str(run_dir / adapter_relpath(1)))
                                                     if "lora_B" in k)


def test_a_round_that_kept_the_previous_adapter_audits_only_if_nothing_changed(run_dir: Path,
                                                                              tmp_path: Path) -> None:
    run = _tampered(run_dir, tmp_path)
    shutil.copyfile(run / adapter_relpath(2), _save_adapter(run, 3, {}))  # round 3: too few valid updates
    record_kept_round(run, 3, {"17": "update: 'x' holds NaN or infinite values"}, "1 valid update(s), fewer than 2")
    assert [(v.round, v.ok, v.clients) for v in _audit(run)][-1] == (3, True, 0)
    _nudge_first_lora_b(run / adapter_relpath(3), index=3, delta=1e-6)
    entries = read_ledger(run)
    entries[3]["adapter_sha256"] = file_sha256(run / adapter_relpath(3))  # a consistent-looking ledger
    (run / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert _failed_rounds(run) == [3]
    assert "aggregated nothing but its global adapter differs" in "; ".join(_audit(run)[3].problems)


def test_audit_cli_runs_standalone_and_fails_nonzero(run_dir: Path, tmp_path: Path) -> None:
    run = _tampered(run_dir, tmp_path)
    _nudge_first_lora_b(run / adapter_relpath(1), index=17, delta=1e-3)
    proc = subprocess.run([sys.executable, "-m", "finlora.zk.cli", "audit", str(run), "--keys", str(run / "keys")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL" in proc.stdout and "round-1/adapter_model.safetensors" in proc.stdout


def test_audit_names_the_round_of_a_changed_adapter_value_even_with_the_hash_updated(run_dir: Path,
                                                                                   tmp_path: Path) -> None:
    run = _tampered(run_dir, tmp_path)
    path = run / adapter_relpath(2)
    _nudge_first_lora_b(path, index=0, delta=1e-6)
    entries = read_ledger(run)
    entries[2]["adapter_sha256"] = file_sha256(path)
    (run / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    verdicts = _audit(run)
    assert _failed_rounds(run) == [2]
    assert "previous + aggregate" in "; ".join(verdicts[2].problems)


def test_audit_fails_when_a_lora_a_tensor_changes(run_dir: Path, tmp_path: Path) -> None:
    run = _tampered(run_dir, tmp_path)
    path = run / adapter_relpath(2)
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key][0, 0] = 0.5
    save_file(tensors, str(path))
    assert _failed_rounds(run) == [2]


def test_audit_fails_when_an_accepted_client_is_dropped_from_the_aggregate(run_dir: Path, tmp_path: Path,
                                                                          keys: dict) -> None:
    run = _tampered(run_dir, tmp_path)
    # the server cannot recompute without the update; it fakes a smaller aggregate over two clients' worth
    entry = read_ledger(run)[2]
    total = np.load(run / entry["aggregate_file"])
    blindings = unpack_blindings(base64.b64decode(entry["aggregate_blindings"]))
    rng = np.random.default_rng(9)
    dropped = _values(rng, total.shape[0])
    weight = entry["clients"][0]["num_examples"]
    _rewrite_round(run, 2, total - weight * dropped, blindings, entry["total_weight"] - weight)
    verdicts = _audit(run)
    assert _failed_rounds(run) == [2]
    assert "sum of weighted client commitments != commitment of the aggregate" in verdicts[2].problems
    assert any("total weight" in p for p in verdicts[2].problems)


def test_audit_fails_when_an_update_is_injected(run_dir: Path, tmp_path: Path) -> None:
    run = _tampered(run_dir, tmp_path)
    entry = read_ledger(run)[2]
    total = np.load(run / entry["aggregate_file"])
    rng = np.random.default_rng(10)
    injected = _values(rng, total.shape[0])
    blindings = unpack_blindings(base64.b64decode(entry["aggregate_blindings"]))
    _rewrite_round(run, 2, total + 5 * injected, blindings, entry["total_weight"])
    verdicts = _audit(run)
    assert _failed_rounds(run) == [2]
    assert "sum of weighted client commitments != commitment of the aggregate" in verdicts[2].problems


def test_audit_refuses_a_ledger_written_under_another_row_rule(run_dir: Path, tmp_path: Path) -> None:
    """The row size is part of what the commitments mean: a header from protocol v2 (rows of 4,096 at every size)
    or any other rule than this code's is refused at round 0, not checked against commitments it cannot read."""
    run = _tampered(run_dir, tmp_path)
    entries = read_ledger(run)
    assert entries[0]["row_size"] == ROW_RULE and _failed_rounds(run) == []
    entries[0]["row_size"] = ROW_SIZE
    (run / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    verdicts = _audit(run)
    assert 0 in _failed_rounds(run)
    assert "ledger was written with other Pedersen generators / row size" in verdicts[0].problems


def test_audit_fails_on_a_forged_client_entry(run_dir: Path, tmp_path: Path, keys: dict) -> None:
    run = _tampered(run_dir, tmp_path)
    entries = read_ledger(run)
    client = dict(entries[1]["clients"][0])
    rows = len(unpack_commitments(base64.b64decode(client["commitments"])))
    forged = make_submission(np.zeros(rows * SMALL_ROW_SIZE, np.int64), client["num_examples"], keys["inst-11"],
                             RUN_ID, 1, client["node_id"])
    client["commitments"] = base64.b64encode(b"".join(forged.commitments)).decode()
    client["signature"] = forged.signature.hex()
    entries[1]["clients"][0] = client
    (run / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    verdicts = _audit(run)
    assert 1 in _failed_rounds(run)
    assert any("bad signature" in p for p in verdicts[1].problems)


def test_a_server_made_round_under_server_made_keys_fails_the_audit(run_dir: Path, tmp_path: Path) -> None:
    """Security finding 8: the server writes the ledger, so it could swap an institution's key in the header for
    its own and sign a made-up update with it. The audit checks against the keys the institutions published."""
    run = _tampered(run_dir, tmp_path)
    entries = read_ledger(run)
    server_key = signing.generate_key()
    victim = entries[1]["clients"][0]
    entries[0]["public_keys"][victim["node_id"]] = signing.public_key_raw(server_key.public_key()).hex()
    commitments = unpack_commitments(base64.b64decode(victim["commitments"]))
    victim["signature"] = _sign(server_key, victim["node_id"], commitments, victim["num_examples"], round_num=1).hex()
    (run / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    trusting_the_ledger = {n: signing.public_key_from_raw(bytes.fromhex(raw))
                           for n, raw in entries[0]["public_keys"].items()}
    trusting = audit_run(run, trusting_the_ledger)  # what the audit used to do: header and made-up round pass
    assert trusting[0].ok and trusting[1].ok, trusting
    verdicts = _audit(run)
    assert _failed_rounds(run)[:2] == [0, 1]
    assert f"institution {victim['node_id']}: the ledger's key is not the one given with --keys" in verdicts[0].problems
    assert f"node {victim['node_id']}: bad signature" in verdicts[1].problems
    # a key missing from what the institutions published, or one they did not publish, fails the header too
    assert any("in the ledger but not in --keys" in p
               for p in audit_run(run, {k: v for k, v in _published(run).items() if k != "inst-2"})[0].problems)


def test_the_audit_needs_keys_from_outside_the_ledger(run_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "finlora.zk.cli", "audit", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--keys" in proc.stderr, proc.stderr


def test_equal_weighting_is_audited_from_the_header(keys: dict, tmp_path: Path) -> None:
    """strategy.weighting = equal: every accepted client weighs 1 in the aggregate and in the audit's equation."""
    run = tmp_path / RUN_ID
    rng = np.random.default_rng(11)
    clients = {f"inst-{i}": (keys[f"inst-{i}"], 1000 * (i + 1)) for i in range(2)}
    global_ = _adapter0(rng)
    append_entry(run, header_entry(RUN_ID, {n: k.public_key() for n, (k, _) in clients.items()},
                                   file_sha256(_save_adapter(run, 0, global_)), BOUND, FRAC, BITS, weighting="equal"))
    for name, (key, _) in clients.items():
        signing.save_public_key(key.public_key(), run / "keys" / f"{name}{signing.PUBLIC_SUFFIX}")
    delta = {k: rng.normal(0, 0.005, v.shape) for k, v in global_.items() if "lora_B" in k}
    subs = []
    for name, (key, n) in clients.items():
        values, layout = quantize_update(delta, BOUND, FRAC, BITS, rng)
        subs.append(make_submission(values, n, key, RUN_ID, 1, name))
    total, blindings, weight = aggregate(subs, equal_weights=True)
    assert weight == 2
    _save_adapter(run, 1, apply_aggregate(global_, total, layout, weight, FRAC))
    record_round(run, 1, layout, subs, {}, total, blindings, weight)
    assert [v.ok for v in _audit(run)] == [True, True]
    entries = read_ledger(run)
    entries[0]["weighting"] = "examples"  # the same round read as example-weighted does not add up
    (run / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert _failed_rounds(run) == [1]


def test_random_blindings_are_reduced_and_distinct() -> None:
    blindings = random_blindings(8)
    assert all(0 <= r < GROUP_ORDER for r in blindings) and len(set(blindings)) == 8


def test_zk_imports_neither_torch_nor_flower() -> None:
    code = ("import sys, finlora.zk.audit, finlora.zk.cli, finlora.zk.ledger, finlora.zk.verify; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
