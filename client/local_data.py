"""Which rows an institution trains on: its private file when deployed, its partition in simulation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finlora.client.node_settings import NodeSettings
from finlora.common.config import DataConfig
from finlora.common.data import Example, encode_rows, load_rows, partition_rows, read_jsonl, split_heldout

LOCAL_VAL_SIZE = 16
"""Rows of each institution kept back for federated evaluation of the global adapter."""


@dataclass(frozen=True)
class LocalData:
    """An institution's tokenized training and validation examples."""

    train: list[Example]
    val: list[Example]
    source: str


def node_data_key(node_config: Mapping[str, Any] | NodeSettings) -> tuple[str, int, int]:
    """(data-path, partition-id, num-partitions) from Flower's node config; a data-path wins."""
    return NodeSettings.parse(node_config).data_key


LOCAL_DATA_CACHE: dict[tuple[Any, ...], LocalData] = {}
"""Explicit per-process cache: (data config, node key, tokenizer identity) -> tokenized local data."""


def local_data(data_cfg: DataConfig, node_key: tuple[str, int, int], tokenizer: Any) -> LocalData:
    """Load, split and tokenize once per process and node; later rounds reuse it."""
    key = (data_cfg, node_key, id(tokenizer))
    if key not in LOCAL_DATA_CACHE:
        LOCAL_DATA_CACHE[key] = _load_local_data(data_cfg, node_key, tokenizer)
    return LOCAL_DATA_CACHE[key]


def _load_local_data(data_cfg: DataConfig, node_key: tuple[str, int, int], tokenizer: Any) -> LocalData:
    path, partition_id, num_partitions = node_key
    if path:
        rows = read_jsonl(path)
        source = path
    else:
        pool, _heldout = split_heldout(load_rows(data_cfg), data_cfg.heldout_size, data_cfg.seed)
        rows = partition_rows(pool, num_partitions, partition_id, data_cfg.partitioner, data_cfg.dirichlet_alpha,
                              data_cfg.seed)
        source = f"{data_cfg.source}[partition {partition_id}/{num_partitions}]"
    train_rows, val_rows = split_heldout(rows, LOCAL_VAL_SIZE, data_cfg.seed + 1)
    return LocalData(encode_rows(train_rows, tokenizer, data_cfg.max_length),
                     encode_rows(val_rows, tokenizer, data_cfg.max_length), source)
