"""Loggers for finlora modules.

They are children of Flower's ``flwr`` logger on purpose: inside a run, Flower forwards that logger's
records to the SuperLink, so ``flwr run --stream`` (and ``finlora simulate``) show finlora's own messages
in the same stream as Flower's, formatted alike, without a second handler or ``basicConfig``.
"""

from __future__ import annotations

import logging


def get_logger(module: str) -> logging.Logger:
    return logging.getLogger("flwr").getChild(module)
