"""Say goodbye for a SuperNode that died: ``DeactivateNode`` at the SuperLink, signed with the node's own key.

A SuperNode that stops normally deactivates itself on the way out (Flower 1.42, ``fleet_http_connection``: its
``finally`` sends ``DeactivateNode``), and the SuperLink answers the node's pending messages with "node
unavailable" at once. A SuperNode that is killed or crashes cannot, and the SuperLink notices it only after
``HEARTBEAT_PATIENCE`` x 30 s of missed heartbeats (not configurable in Flower 1.42): up to a minute in which every
other institution's reply waits in a round that can no longer complete. ``finlora client`` outlives its SuperNode
and holds the same SuperNode-auth key, so it sends the same request the SuperNode would have sent. Only the node
itself can do this (the SuperLink checks that the signing key is the node's); a machine that dies whole still
falls back on the heartbeats.
"""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

NODE_ID_PATTERN = re.compile(r"SuperNode ID: (\d+)")
"""What ``flower-supernode`` logs once the SuperLink activated it (Flower 1.42, ``start_client_internal``)."""


def node_id_in(line: str) -> int | None:
    """The node id a SuperNode log line announces, if it is that line."""
    found = NODE_ID_PATTERN.search(line)
    return int(found.group(1)) if found else None


def deactivate_node(superlink: str, ca: Path, key: Path, node_id: int) -> None:
    """Deactivate ``node_id`` at ``superlink`` over TLS (``ca``), signed with the SuperNode-auth ``key``.

    Raises whatever the transport or the SuperLink raises (``httpx.HTTPError``, ``ValueError`` for a bad key): the
    caller reports it and the heartbeats remain the fallback."""
    # flwr is imported here, not at the top: only this rare path needs it, and it costs ~1 s at start-up
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private_key = load_ssh_private_key(key.read_bytes(), None)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key}: not an EC SuperNode-auth key")
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                    NodeAuthHttpInterceptor(private_key, private_key.public_key())]
    with FleetHttpClient.from_server_address(superlink, False, str(ca), interceptors=interceptors) as client:
        client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
