"""client/node_settings.py: every node-config key finlora reads is parsed and checked once, with the key named."""

from __future__ import annotations

import pytest

from finlora.client.dp_setup import enforce_policy
from finlora.client.node_settings import NodeConfigError, NodeSettings
from finlora.common.config import load_config


def test_a_simulated_node_and_a_deployed_one():
    sim = NodeSettings.parse({"partition-id": 2, "num-partitions": 3})
    assert not sim.deployed and sim.data_key == ("", 2, 3) and sim.institution_name == "institution-2"
    bank = NodeSettings.parse({"data-path": "/data/bank-a.jsonl", "institution": "bank-a", "dp-epsilon": "4",
                               "dp-required": "false", "zk-key": "/keys/bank-a.key"})
    assert bank.deployed and bank.institution_name == "bank-a" and bank.dp_epsilon == 4.0
    assert bank.dp_required is False and bank.zk_key == "/keys/bank-a.key"
    assert NodeSettings.parse(bank) is bank


@pytest.mark.parametrize("raw, message", [
    ({"partition-id": "first"}, "node config partition-id = 'first': expected a whole number"),
    ({"partition-id": 1.5}, "node config partition-id = 1.5: expected a whole number"),
    ({"num-partitions": 0}, "node config num-partitions = 0: expected at least 1"),
    ({"dp-epsilon": "lots"}, "node config dp-epsilon = 'lots': expected a number"),
    ({"dp-delta": 0}, "node config dp-delta = 0.0: expected a positive number"),
    ({"dp-required": "yes"}, "node config dp-required = 'yes': expected true or false"),
])
def test_a_bad_value_names_its_key(raw, message):
    with pytest.raises(NodeConfigError) as err:
        NodeSettings.parse(raw)
    assert str(err.value) == message


def test_a_bad_policy_value_stops_the_institution_before_any_training():
    """A typo in an institution's own DP policy must not silently fall back to the server's setting."""
    with pytest.raises(NodeConfigError, match="dp-epsilon"):
        enforce_policy(load_config().dp, {"data-path": "/data/bank-a.jsonl", "dp-epsilon": "eight"}, 100)
