"""A mixture of LoRA experts: per-task adapters as frozen experts and a small learned router (PEFT's X-LoRA).

X-LoRA (Buehler & Buehler, 2024) runs the model once to read its hidden states, a classifier turns them into
per-token, per-layer weights over the experts, and a second pass applies the experts with those weights. Only the
classifier (the router, ~10^5 parameters on the tiny model) is trained, so it is cheap to train and to exchange.

On disk a mixture is a directory: ``moe.json`` (the experts by name and path, the router's depth, the base model)
and ``router.safetensors`` (every router weight). We save the router ourselves: PEFT 0.21's X-LoRA
``save_pretrained`` keeps only the classifier's last layer (for ``xlora_depth`` > 1 a reloaded mixture differs),
and a mixture should load back exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finlora.common.adapter import CONFIG_FILE, AdapterError
from finlora.common.io import atomic_write_dir

MOE_CONFIG = "moe.json"
ROUTER_FILE = "router.safetensors"
ROUTER_KEY = "internal_xlora_classifier"
LAYER_SIZE = 256
"""The router classifier's hidden width (X-LoRA ``xlora_size``) of every mixture finlora builds."""


class MixtureError(ValueError):
    """A mixture directory or its experts are unusable; the message names the file or expert."""


def check_experts(experts: Mapping[str, Path]) -> dict[str, Path]:
    """Two or more expert adapter directories by name, resolved; errors name the expert."""
    if len(experts) < 2:
        raise MixtureError(f"a mixture needs at least 2 experts, got {len(experts)}")
    resolved = {}
    for name, path in experts.items():
        path = Path(path).expanduser().resolve()
        if not (path / CONFIG_FILE).is_file():
            raise MixtureError(f"expert {name!r}: {path} is not a PEFT adapter directory ({CONFIG_FILE} expected)")
        resolved[name] = path
    return resolved


def build_mixture(model: Any, experts: Mapping[str, Path], depth: int = 1, layer_size: int = LAYER_SIZE,
                  top_k: int | None = None) -> Any:
    """Wrap ``model`` (a plain causal LM) with X-LoRA over ``experts``; experts frozen, router trainable."""
    from peft import XLoraConfig, get_peft_model

    experts = check_experts(experts)
    model.config.use_cache = False  # X-LoRA's scaling pass does not support a KV cache
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, xlora_depth=depth,
                         xlora_size=layer_size, top_k_lora=top_k,
                         # X-LoRA names its experts "0", "1", ... internally; moe.json keeps ours, in this order
                         adapters={str(i): str(path) for i, path in enumerate(experts.values())})
    try:
        mixture = get_peft_model(model, config)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise MixtureError(f"the experts do not fit this base model: {exc}") from exc
    for name, param in mixture.named_parameters():
        param.requires_grad_(ROUTER_KEY in name)
    return mixture


def router_state(mixture: Any) -> dict[str, Any]:
    """A copy of the router's weights (never the live parameters, which the next training step changes)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in mixture.state_dict().items() if ROUTER_KEY in k}


def save_mixture(mixture: Any, experts: Mapping[str, Path], out_dir: Path, depth: int, layer_size: int,
                 top_k: int | None, base_model: str, metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``moe.json`` + ``router.safetensors`` atomically."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        (tmp / MOE_CONFIG).write_text(json.dumps({
            "experts": {name: str(Path(p).resolve()) for name, p in experts.items()}, "depth": depth,
            "layer_size": layer_size, "top_k": top_k, "base_model": base_model, **(metadata or {})}, indent=2) + "\n")
        save_file(router_state(mixture), str(tmp / ROUTER_FILE))

    atomic_write_dir(Path(out_dir), fill)


def read_mixture_spec(moe_dir: Path) -> tuple[dict[str, Path], int, int, int | None]:
    """(experts by name, depth, layer size, top-k) from ``moe.json``; errors name the file."""
    moe_dir = Path(moe_dir).expanduser()
    try:
        spec = json.loads((moe_dir / MOE_CONFIG).read_text())
        experts = {str(k): Path(v) for k, v in spec["experts"].items()}
        return experts, int(spec["depth"]), int(spec["layer_size"]), spec.get("top_k")
    except FileNotFoundError as exc:
        raise MixtureError(f"{moe_dir}: not a mixture directory ({MOE_CONFIG} missing)") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MixtureError(f"{moe_dir / MOE_CONFIG}: expected experts, depth and layer_size ({exc})") from exc


def mixture_experts(moe_dir: Path) -> dict[str, Path]:
    """The mixture's expert adapter directories by name, each checked to be a PEFT adapter directory."""
    return check_experts(read_mixture_spec(moe_dir)[0])


def load_mixture(model: Any, moe_dir: Path) -> Any:
    """The mixture saved in ``moe_dir`` on ``model``; its outputs equal the saved one's."""
    moe_dir = Path(moe_dir).expanduser()
    experts, depth, layer_size, top_k = read_mixture_spec(moe_dir)
    if not (moe_dir / ROUTER_FILE).is_file():
        raise MixtureError(f"{moe_dir}: {ROUTER_FILE} missing")
    try:
        mixture = build_mixture(model, experts, depth, layer_size, top_k)
    except AdapterError as exc:
        raise MixtureError(f"{moe_dir}: {exc}") from exc
    load_router_weights(mixture, moe_dir)
    return mixture.eval()


def load_router_weights(mixture: Any, moe_dir: Path) -> None:
    """Load ``moe_dir``'s saved router into ``mixture`` (built over the same experts), checking names and shapes."""
    from safetensors.torch import load_file

    path = Path(moe_dir).expanduser() / ROUTER_FILE
    if not path.is_file():
        raise MixtureError(f"{path.parent}: {ROUTER_FILE} missing")
    load_router_state(mixture, load_file(str(path)), str(path))


def load_router_state(mixture: Any, state: Mapping[str, Any], where: str) -> None:
    """Load router weights (torch tensors by name) into ``mixture`` once they are exactly its router's names and
    shapes; ``where`` names their origin in the error (a file, or the server's message)."""
    expected = router_state(mixture)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise MixtureError(f"{where}: router tensors do not fit this mixture (missing {missing[:3]}, unexpected "
                           f"{extra[:3]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MixtureError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected "
                               f"{tuple(expected[name].shape)}")
    mixture.load_state_dict(dict(state), strict=False)
