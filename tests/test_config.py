import pytest

from common.config import ConfigError, FinloraConfig, load_config, parse_override, pyproject_defaults


def test_defaults_come_from_pyproject_and_round_trip():
    flat = pyproject_defaults()
    cfg = FinloraConfig.from_flat(flat)
    assert cfg.model.name == "tiny"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_module_list) == (8, 32, ["q_proj", "k_proj", "v_proj"])
    assert set(cfg.to_flat()) == set(flat)
    assert FinloraConfig.from_flat(cfg.to_flat()) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config({"lora.rank": 4})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="lora.r.*expected int"):
        load_config({"lora.r": "eight"})


def test_override_parsing():
    assert parse_override("lora.r=16") == ("lora.r", 16)
    assert parse_override('model.name="meta-llama/Llama-3.1-8B"') == ("model.name", "meta-llama/Llama-3.1-8B")
    assert parse_override("model.name=meta-llama/Llama-3.1-8B") == ("model.name", "meta-llama/Llama-3.1-8B")
    assert parse_override("lora.ffa=true") == ("lora.ffa", True)
    with pytest.raises(ConfigError):
        parse_override("lora.r")
