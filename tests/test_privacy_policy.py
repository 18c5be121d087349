"""An institution, not the server, owns its privacy: a run config that asks a deployed institution for less privacy
than its node config allows is refused by the ClientApp before any training, and its ledger is left as it was
(security finding 2: the server used to be able to switch DP off or move the ledger to a fresh one). The same holds
for secure aggregation: a server cannot switch masking off for an institution that requires it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from finlora.client.dp_setup import PrivacyPolicyViolation, ledger_store
from finlora.client.router_task import cached_mixture
from finlora.client.tasks import train_content
from finlora.common.adapter import initial_adapter, select_keys, to_array_record
from finlora.common.config import ConfigError, load_config
from finlora.common.model import lora_shapes
from finlora.common.moe import router_state
from finlora.common.sample_data import sentiment_rows
from finlora.zk.codec import ZK_RECORD
from finlora.zk.signing import write_key_pair
from tests.conftest import make_random_adapter


@pytest.fixture()
def institution(tmp_path: Path) -> dict:
    data = tmp_path / "bank.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=40, seed=3)))
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    return {"data": data, "ledger_dir": ledger_dir,
            "node_config": {"data-path": str(data), "institution": "bank-p", "dp-state-dir": str(ledger_dir),
                            "dp-epsilon": 8.0, "dp-max-grad-norm": 1.0,
                            "secagg-required": False}}  # the DP tests' rounds send plaintext updates (zk off)


def _round(node_config: dict, **run: object) -> RecordDict:
    """Round 1 of a run with the server's ``run`` config, handled by the real ClientApp task function."""
    cfg = load_config({"zk.enabled": False, "train.local-steps": 1, **run})
    shapes = lora_shapes(cfg.model, cfg.lora)
    content = RecordDict({"arrays": to_array_record(select_keys(initial_adapter(shapes, cfg.lora.seed), cfg.lora.ffa)),
                          "config": ConfigRecord({"server-round": 1, "num-rounds": cfg.num_rounds})})
    context = Context(run_id=5, node_id=9, node_config=node_config, state=RecordDict(), run_config=cfg.to_flat())
    return train_content(content, context)


@pytest.mark.parametrize("run, key", [
    ({"dp.enabled": False}, "dp.enabled"),
    ({"dp.enabled": True, "dp.level": "client"}, "dp.level"),
    ({"dp.enabled": True, "dp.epsilon": 50.0}, "dp.epsilon"),
    ({"dp.enabled": True, "dp.max-grad-norm": 10.0}, "dp.max-grad-norm"),
])
def test_a_server_asking_for_less_privacy_is_refused(institution: dict, run: dict, key: str) -> None:
    with pytest.raises(PrivacyPolicyViolation, match=key.replace(".", r"\.")):
        _round(institution["node_config"], **run)
    assert not list(institution["ledger_dir"].iterdir())  # nothing trained, nothing recorded


def test_a_stricter_delta_policy_refuses_a_looser_run_delta(institution: dict) -> None:
    with pytest.raises(PrivacyPolicyViolation, match=r"dp\.delta"):
        _round({**institution["node_config"], "dp-delta": 1e-6}, **{"dp.enabled": True, "dp.delta": 1e-3})


def test_the_server_cannot_move_the_ledger(institution: dict) -> None:
    """``dp.state-dir`` is no longer a run-config key: a server that sends it is refused at config load."""
    with pytest.raises(ConfigError, match="dp.state-dir"):
        load_config({"dp.state-dir": "fresh-ledger"})


def test_more_privacy_is_accepted_and_spent_in_the_institutions_own_ledger(institution: dict) -> None:
    reply = _round(institution["node_config"], **{"dp.enabled": True, "dp.epsilon": 4.0})
    metrics = reply["metrics"]
    assert 0 < metrics["dp-epsilon"] <= 8.0 and metrics["dp-target-epsilon"] == 8.0
    store = ledger_store(load_config().dp, institution["node_config"], state=None)
    assert store.path.parent == institution["ledger_dir"] and store.load().steps == 1


def test_an_institution_that_allows_no_dp_trains_without_it(institution: dict) -> None:
    reply = _round({**institution["node_config"], "dp-required": False}, **{"dp.enabled": False})
    assert "dp-epsilon" not in reply["metrics"]


@pytest.mark.parametrize("run, key", [({"zk.enabled": True, "zk.secagg": False}, "zk.secagg = false"),
                                      ({"zk.enabled": False}, "zk.enabled = false")])
def test_a_server_that_switches_secure_aggregation_off_is_refused(institution: dict, run: dict, key: str) -> None:
    """The malicious server's run config would have the institution send its update unmasked (committed in the
    clear, or as plaintext floats): an institution that requires secure aggregation (the default of ``finlora
    client``) refuses before training, and spends nothing; ``--allow-unmasked`` (node config) accepts it."""
    required = {**institution["node_config"], "secagg-required": True}
    with pytest.raises(PrivacyPolicyViolation, match=f"run config {key}.*secagg-required"):
        _round(required, **{"dp.enabled": True, **run})
    assert not list(institution["ledger_dir"].iterdir())
    if not run.get("zk.enabled", True):
        assert "train-loss" in _round(institution["node_config"], **{"dp.enabled": True, **run})["metrics"]


def test_a_server_cannot_reach_an_institutions_data_through_a_router_run(institution: dict, tmp_path: Path) -> None:
    """A mixture run (``moe.experts``) is no way around an institution's policy: the malicious server's router run
    that switches DP-SGD or masking off is refused before training, and spends nothing; one that keeps them trains
    the router with DP-SGD against the institution's own ledger and replies with commitments, a proof and a masking
    advertisement, never a value."""
    for i in range(2):
        make_random_adapter(tmp_path / f"e{i}", seed=10 + i, scale=0.2)
    write_key_pair(tmp_path / "bank-p.key", tmp_path / "bank-p.pub.pem")
    node = {**institution["node_config"], "secagg-required": True, "zk-key": str(tmp_path / "bank-p.key")}

    def router_round(**run: object) -> RecordDict:
        cfg = load_config({"moe.experts": f"e0={tmp_path / 'e0'},e1={tmp_path / 'e1'}", "train.local-steps": 1,
                           **run})
        router = {k: v.numpy() for k, v in router_state(cached_mixture(cfg)[0]).items()}
        content = RecordDict({"arrays": to_array_record(router),
                              "config": ConfigRecord({"server-round": 1, "num-rounds": cfg.num_rounds})})
        return train_content(content, Context(run_id=5, node_id=9, node_config=node, state=RecordDict(),
                                              run_config=cfg.to_flat()))

    for run, refusal in (({"dp.enabled": False}, r"dp\.enabled = false"), ({"zk.secagg": False}, "zk.secagg = false"),
                         ({"zk.enabled": False}, "zk.enabled = false")):
        with pytest.raises(PrivacyPolicyViolation, match=refusal):
            router_round(**run)
    assert not list(institution["ledger_dir"].iterdir())  # nothing trained, nothing recorded
    reply = router_round()  # the defaults: DP-SGD, commitments, proof, secure aggregation
    assert len(reply["arrays"]) == 0 and ZK_RECORD in reply.config_records
    assert 0 < reply["metrics"]["dp-epsilon"] <= 8.0
    assert ledger_store(load_config().dp, node, state=None).load().steps == 1
