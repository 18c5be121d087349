"""The resident trainer: one long-lived process per institution that keeps the base model loaded across rounds.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message of a deployment, so without help an
institution would re-import torch and reload its base model (and re-tokenize its data) for every train and
evaluate message. ``finlora client`` therefore also starts ``python -m finlora.client.resident``, which holds the module
caches (:data:`common.model.MODEL_CACHE`, :data:`client.local_data.LOCAL_DATA_CACHE`); the ClientApp process only
hands it each task over a Unix-domain socket (``trainer-socket`` in the node config) and returns its reply.

Three modules, one job each: :mod:`~finlora.client.resident.protocol` (keys, request/reply, errors across the socket,
the ClientApp's :func:`call_trainer`), :mod:`~finlora.client.resident.server` (the trainer process), and
:mod:`~finlora.client.resident.supervisor` (``finlora client``'s :class:`ResidentTrainer`). torch is imported only
inside the trainer process, when it runs its first task.

    python -m finlora.client.resident --socket P --authkey-file F [--exit-with-parent]
"""

from finlora.client.resident.protocol import (TrainerStartError, TrainerUnavailable, call_trainer, error_reply, ping,
                                              raise_error_reply, read_authkey, write_authkey)
from finlora.client.resident.supervisor import ResidentTrainer

__all__ = ["ResidentTrainer", "TrainerStartError", "TrainerUnavailable", "call_trainer", "error_reply", "ping",
           "raise_error_reply", "read_authkey", "write_authkey"]
