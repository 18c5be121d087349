"""Wire precision of float updates (transport.dtype) and the update norm bound, both sides of the wire. (int8 updates
crossing Flower end to end: test_simulation.py::test_fedadam_over_int8_updates_runs_and_resumes_with_its_moments.)"""

from __future__ import annotations

import numpy as np
import pytest

from finlora.common.adapter import AdapterError
from finlora.common.transport import decode_update, delta_norm, encode_update, wire_dtype


def _adapter(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layer.0.lora_A.weight": (scale * rng.standard_normal((8, 64))).astype(np.float32),
            "layer.0.lora_B.weight": (scale * rng.standard_normal((64, 8))).astype(np.float32)}


@pytest.mark.parametrize("dtype, bytes_per_value, tolerance", [("float32", 4, 1e-6), ("float16", 2, 1e-3),
                                                               ("int8", 1, 1e-2)])
def test_each_dtype_decodes_to_the_local_weights(dtype, bytes_per_value, tolerance):
    global_arrays = _adapter(0)
    local = {k: v + 0.01 * _adapter(1)[k] for k, v in global_arrays.items()}
    encoded = encode_update(local, global_arrays, dtype, max_norm=0.0)
    assert sum(a.nbytes for a in encoded.arrays.values()) == bytes_per_value * 2 * 8 * 64
    assert not encoded.clipped
    decoded = decode_update(encoded.arrays, encoded.record, global_arrays, "test")
    true_delta = delta_norm({k: local[k].astype(np.float64) - global_arrays[k] for k in local})
    error = delta_norm({k: decoded[k].astype(np.float64) - local[k] for k in local})
    assert all(v.dtype == np.float32 for v in decoded.values())
    assert error <= tolerance * true_delta, (dtype, error, true_delta)
    assert encoded.norm == pytest.approx(true_delta, rel=tolerance)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_update_is_clipped_to_the_bound_after_rounding(dtype):
    global_arrays = _adapter(0)
    local = {k: v + _adapter(2, scale=3.0)[k] for k, v in global_arrays.items()}
    encoded = encode_update(local, global_arrays, dtype, max_norm=2.0)
    decoded = decode_update(encoded.arrays, encoded.record, global_arrays, "test")
    sent = delta_norm({k: decoded[k].astype(np.float64) - global_arrays[k] for k in decoded})
    assert encoded.clipped and sent <= 2.0 * (1 + 1e-6) and sent > 1.99
    # the direction is kept: clipping scales, it does not distort
    direction = np.concatenate([(decoded[k].astype(np.float64) - global_arrays[k]).ravel() for k in sorted(local)])
    original = np.concatenate([(local[k].astype(np.float64) - global_arrays[k]).ravel() for k in sorted(local)])
    cosine = direction @ original / (np.linalg.norm(direction) * np.linalg.norm(original))
    assert cosine > 0.999


def test_bad_encodings_are_refused_with_the_reason():
    global_arrays = _adapter(0)
    encoded = encode_update({k: v + 0.1 for k, v in global_arrays.items()}, global_arrays, "int8", 0.0)
    key = sorted(encoded.arrays)[0]
    for scale, expected in ((0.0, "positive finite float scale"), (float("nan"), "positive finite float scale")):
        with pytest.raises(AdapterError, match=expected):
            decode_update(encoded.arrays, {**encoded.record, f"scale.{key}": scale}, global_arrays, "node 7")
    with pytest.raises(AdapterError, match="node 7: unknown transport encoding"):
        wire_dtype({"dtype": "int4", "encoding": "delta"}, "node 7")
    with pytest.raises(ValueError, match="transport.dtype must be one of"):
        encode_update(global_arrays, global_arrays, "bfloat16", 0.0)
