import pytest

from finlora.common.config import ConfigError, FinloraConfig, load_config, parse_override, pyproject_defaults


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


# Security hardening, finding 9: a value outside a key's choices or range fails at load, naming the key, the value
# and what is allowed (``dp.level = samples`` used to load, and then neither client nor server applied DP).

BAD_CHOICES = {
    "model.quantization": ("4bit", ("'4'", "'8'", "'none'")),
    "data.partitioner": ("dirichlett", ("'iid'", "'dirichlet'")),
    "train.lr-schedule": ("linear", ("'constant'", "'cosine'")),
    "strategy.name": ("fedsgd", ("'fedavg'", "'fedprox'", "'fedadam'", "'fedyogi'")),
    "strategy.weighting": ("claimed", ("'examples'", "'equal'")),
    "transport.dtype": ("bfloat16", ("'float32'", "'float16'", "'int8'")),
    "dp.level": ("samples", ("'sample'", "'client'")),
    "dp.accountant": ("gdp", ("'rdp'", "'prv'")),
    "eval.mode": ("slow", ("'fast'", "'finlora'")),
    "zk.bits": (12, ("8", "16")),
}


def test_dp_level_typo_is_rejected_at_load():
    with pytest.raises(ConfigError) as info:
        FinloraConfig.from_flat({**pyproject_defaults(), "dp.level": "samples"})
    message = str(info.value)
    assert "dp.level" in message and "'samples'" in message and "'sample', 'client'" in message


@pytest.mark.parametrize("key", sorted(BAD_CHOICES))
def test_every_choice_key_rejects_a_value_outside_its_choices(key):
    bad, allowed = BAD_CHOICES[key]
    with pytest.raises(ConfigError) as info:
        load_config({key: bad})
    message = str(info.value)
    assert f"'{key}'" in message and repr(bad) in message
    assert all(a in message for a in allowed), message


def test_choice_values_are_coerced_like_the_cli_and_flower_send_them():
    assert load_config({"model.quantization": 8}).model.quantization == "8"  # --set model.quantization=8 is TOML int
    assert load_config({"zk.bits": 8.0}).zk.bits == 8
    assert load_config({"strategy.weighting": "equal"}).strategy.weighting == "equal"
    with pytest.raises(ConfigError, match="zk.bits"):
        load_config({"zk.bits": "16"})


@pytest.mark.parametrize("key, bad", [
    ("num-rounds", 0), ("lora.r", 0), ("lora.alpha", 0), ("lora.dropout", 1.0), ("lora.seed", -1),
    ("data.dirichlet-alpha", 0.0), ("data.max-length", 1), ("train.batch-size", 0), ("train.lr", 0.0),
    ("train.lr-min-ratio", 1.5), ("train.local-steps", -1), ("strategy.fraction-train", 0.0),
    ("strategy.fraction-train", 1.5), ("strategy.fraction-evaluate", -0.1), ("strategy.min-train-nodes", 0),
    ("strategy.min-evaluate-nodes", 0), ("strategy.min-available-nodes", 0), ("strategy.round-timeout", 0.0),
    ("strategy.max-examples", 0), ("strategy.max-update-norm", -1.0), ("dp.epsilon", 0.0),
    ("dp.epsilon", float("nan")), ("dp.delta", 1.0), ("dp.delta", -1e-5), ("dp.max-grad-norm", 0.0),
    ("dp.noise-multiplier", -0.5), ("zk.norm-bound", 0.0), ("zk.frac-bits", -1), ("zk.frac-bits", 64),
    ("eval.batch-size", 0), ("eval.every", -1),
])
def test_numbers_outside_their_range_are_rejected_naming_the_key(key, bad):
    with pytest.raises(ConfigError, match=f"'{key}' = .* out of range"):
        load_config({key: bad})


def test_range_edges_that_mean_something_still_load():
    cfg = load_config({"strategy.fraction-evaluate": 0.0, "dp.noise-multiplier": 0.0, "eval.every": 0,
                       "dp.delta": 0.0, "train.max-grad-norm": 0.0, "lora.dropout": 0.0,
                       "train.local-steps": 0, "train.local-epochs": 1})
    assert cfg.strategy.fraction_evaluate == 0.0 and cfg.train.local_epochs == 1
    with pytest.raises(ConfigError, match="train.local-steps"):
        load_config({"train.local-steps": 0, "train.local-epochs": 0})


def test_client_epsilons_must_be_positive_numbers():
    assert load_config({"dp.client-epsilons": "8, , 2.5"}).dp.client_epsilons == "8, , 2.5"
    for bad in ("8,x", "8,-1", "0"):
        with pytest.raises(ConfigError, match="dp.client-epsilons"):
            load_config({"dp.client-epsilons": bad})


def test_dp_state_dir_is_no_longer_a_key():
    """A server must not choose where an institution keeps its privacy ledger."""
    with pytest.raises(ConfigError, match="dp.state-dir"):
        load_config({"dp.state-dir": "elsewhere"})
    with pytest.raises(ConfigError, match="unknown config key.*dp.state-dir"):
        FinloraConfig.from_flat({**pyproject_defaults(), "dp.state-dir": ""})


def test_strategy_weighting_defaults_to_examples():
    assert load_config().strategy.weighting == "examples"


def test_cli_rejects_a_dp_level_typo_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "finlora.simulation.cli", "simulate", "--set", "dp.level=samples",
                           "--out", str(tmp_path), "--run-id", "typo"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "dp.level" in lines[0] and "'sample', 'client'" in lines[0], lines
    assert not (tmp_path / "typo").exists()


def test_eval_tasks_must_name_known_tasks():
    assert load_config({"eval.tasks": "all"}).eval.tasks == "all"
    assert load_config({"eval.tasks": "fpb, ner"}).eval.tasks == "fpb, ner"
    with pytest.raises(ConfigError, match="eval.tasks.*'fbp'"):
        load_config({"eval.tasks": "fbp,tfns"})


@pytest.mark.parametrize("nonce", ["xyz", "ABCDEF0123456789", "0" * 8, "0" * 65])
def test_zk_run_nonce_must_be_lowercase_hex(nonce):
    with pytest.raises(ConfigError, match="zk.run-nonce"):
        load_config({"zk.run-nonce": nonce})
    assert load_config({"zk.run-nonce": "0123456789abcdef"}).signed_run_id(3) == "run-3#0123456789abcdef"
