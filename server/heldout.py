"""The server's held-out loss of each global adapter (also at round 0, before any training)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from finlora.common.adapter import load_lora_state
from finlora.common.config import FinloraConfig
from finlora.common.data import encode_rows, load_rows, split_heldout
from finlora.common.evaluation import answer_loss
from finlora.common.model import get_model_bundle


class HeldoutEvaluator:
    """Loads the base model once and scores adapters on rows that no institution trains on."""

    def __init__(self, cfg: FinloraConfig) -> None:
        self.cfg = cfg
        self.bundle = get_model_bundle(cfg.model, cfg.lora)
        _, held = split_heldout(load_rows(cfg.data), cfg.data.heldout_size, cfg.data.seed)
        self.examples = encode_rows(held, self.bundle.tokenizer, cfg.data.max_length)

    def loss(self, arrays: Mapping[str, np.ndarray]) -> float:
        load_lora_state(self.bundle.model, arrays)
        loss, _ = answer_loss(self.bundle.model, self.examples, self.cfg.eval.batch_size,
                              self.bundle.tokenizer.pad_token_id)
        return loss
