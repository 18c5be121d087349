"""The Fleet gateway: the only thing ``finlora server`` exposes to the network.

Flower 1.42's SuperLink is one HTTP app serving, on one port, the Fleet API (``/v1/fleet/*``, what SuperNodes
speak), the Control API (``/v1/control/*``: register and unregister SuperNodes, start, list and stop runs), the
Runtime API, ``/health`` and the OpenAPI docs. The Control API has no authentication in the OSS distribution
(account auth needs ``flwr.ee``), so whoever reaches the port with the public CA certificate could register
their own SuperNode key or stop runs. ``finlora server`` therefore binds the SuperLink to 127.0.0.1 on an
internal port and runs this gateway on the public ``--host:--port``:

* it terminates TLS with the federation's ``server.pem`` / ``server.key`` (what institutions verify with ``ca.crt``);
* it forwards ONLY ``POST`` to the Fleet endpoints in :data:`FLEET_PATHS` (Flower's
  ``flwr/superlink/routers/fleet/router.py``; a SuperNode calls nothing else, see
  ``flwr/supernode/fleet_http_client.py``), with the body and the node-auth headers unchanged, so the SuperLink
  still authenticates every node itself (``--enable-supernode-auth``);
* it answers 404 to everything else and logs one line per refused request (method, path, peer);
* the upstream connection verifies the SuperLink's loopback certificate (``--upstream-ca``).

Run as ``python -m finlora.server.fleet_gateway --listen HOST:PORT --upstream 127.0.0.1:PORT [TLS options]``.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import ssl
import sys
from pathlib import Path
from typing import Any

FLEET_PATHS = frozenset(f"/v1/fleet/{endpoint}" for endpoint in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat", "pull-messages",
    "push-messages", "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received"))
"""The Fleet API of Flower 1.42 (``flwr/superlink/routers/fleet/router.py``), all ``POST``; nothing else passes."""

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Flower sends objects in chunks of at most 5 MB; a request body past this is refused (413) unread."""

_DROPPED_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "proxy-connection",
                              "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
                              "proxy-authenticate", "server", "date"})
"""Hop-by-hop headers (and those the HTTP layers set themselves); every other header passes unchanged."""

log = logging.getLogger("finlora.fleet-gateway")


class FleetGateway:
    """An ASGI app forwarding the Fleet API allow-list to one upstream SuperLink over one shared client."""

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool, timeout_s: float = 120.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.verify = verify
        self.timeout_s = timeout_s
        self.client: Any = None  # httpx.AsyncClient, opened in the ASGI lifespan (on the server's event loop)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # anything else (websocket) is never accepted: uvicorn runs with ws="none"

    async def _lifespan(self, receive: Any, send: Any) -> None:
        import httpx

        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(verify=self.verify, timeout=self.timeout_s, follow_redirects=False,
                                                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict, receive: Any, send: Any) -> None:
        import httpx
        from starlette.requests import Request
        from starlette.responses import Response

        method, path = scope["method"], scope["path"]
        peer = "%s:%s" % tuple(scope["client"]) if scope.get("client") else "?"
        if method != "POST" or path not in FLEET_PATHS:
            log.warning("refused %s %s from %s", method, path[:200], peer)
            await Response(b"Not Found", status_code=404, media_type="text/plain")(scope, receive, send)
            return
        target = next(p for p in FLEET_PATHS if p == path)  # forward our own constant, never the client's string
        request = Request(scope, receive)
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            log.warning("refused %s %s from %s: body over %d bytes", method, path, peer, MAX_BODY_BYTES)
            await Response(b"Payload Too Large", status_code=413, media_type="text/plain")(scope, receive, send)
            return
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_BODY_BYTES:
                log.warning("refused %s %s from %s: body over %d bytes", method, path, peer, MAX_BODY_BYTES)
                await Response(b"Payload Too Large", status_code=413, media_type="text/plain")(scope, receive, send)
                return
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in _DROPPED_HEADERS]
        try:
            upstream = await self.client.send(
                self.client.build_request("POST", self.upstream + target, content=bytes(body), headers=headers),
                stream=True)
            try:
                content = b"".join([part async for part in upstream.aiter_raw()])
            finally:
                await upstream.aclose()
        except httpx.HTTPError as exc:  # SuperLink down or restarting: SuperNodes retry on 503
            log.error("upstream SuperLink unavailable for %s from %s: %s", path, peer, exc)
            await Response(b"SuperLink unavailable", status_code=503, media_type="text/plain")(scope, receive, send)
            return
        reply_headers = {k: v for k, v in upstream.headers.multi_items() if k.lower() not in _DROPPED_HEADERS}
        await Response(content, status_code=upstream.status_code, headers=reply_headers)(scope, receive, send)


def upstream_ssl_context(ca: Path) -> ssl.SSLContext:
    """Verify the loopback SuperLink's certificate against its CA (and its name, 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finlora.server.fleet_gateway",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT the institutions connect to")
    parser.add_argument("--upstream", required=True, help="127.0.0.1:PORT of the SuperLink")
    parser.add_argument("--certfile", help="server certificate (PEM) presented to the institutions")
    parser.add_argument("--keyfile", help="its private key")
    parser.add_argument("--upstream-ca", help="CA that certifies the SuperLink's loopback certificate")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP on both sides (testing only)")
    parser.add_argument("--log-file", help="append the gateway's log here (default: stderr)")
    args = parser.parse_args(argv)
    # refused requests are logged one line each: rotate, so that a flood of them cannot fill the disk
    handler: logging.Handler = (logging.handlers.RotatingFileHandler(args.log_file, maxBytes=20 * 2**20, backupCount=2)
                                if args.log_file else logging.StreamHandler())
    handler.setFormatter(logging.Formatter("%(asctime)s fleet-gateway %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if not args.insecure and not (args.certfile and args.keyfile and args.upstream_ca):
        parser.error("--certfile, --keyfile and --upstream-ca are required unless --insecure")
    host, _, port = args.listen.rpartition(":")
    upstream_host, _, upstream_port = args.upstream.rpartition(":")
    if upstream_host not in ("127.0.0.1", "localhost", "[::1]"):
        parser.error("--upstream must be a loopback address")
    import uvicorn

    app = FleetGateway(f"{'http' if args.insecure else 'https'}://{upstream_host}:{int(upstream_port)}",
                       verify=False if args.insecure else upstream_ssl_context(Path(args.upstream_ca)))
    log.info("forwarding %s (%s) to the Fleet API of %s; everything else answers 404", args.listen,
             "INSECURE" if args.insecure else "TLS", args.upstream)
    uvicorn.run(app, host=host.strip("[]"), port=int(port), ssl_certfile=None if args.insecure else args.certfile,
                ssl_keyfile=None if args.insecure else args.keyfile, lifespan="on", ws="none", access_log=False,
                server_header=False, log_level="warning", timeout_keep_alive=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
