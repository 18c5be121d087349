"""Client mods: Flower's client-side fixed clipping, applied only when the server asks for it.

With ``dp.level = client`` the server wraps its strategy in ``DifferentialPrivacyClientSideFixedClipping``,
which puts the clipping norm into every train message; Flower's ``fixedclipping_mod`` then clips this
institution's update (local minus global) to that norm before it leaves. Flower's mod fails on messages
without that key, so this wrapper passes every other message straight through.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def client_level_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type == MessageType.TRAIN and any(
            KEY_CLIPPING_NORM in rec for rec in msg.content.config_records.values()):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
