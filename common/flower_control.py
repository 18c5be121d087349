"""The SuperLink's Control API, called from this process: register / unregister SuperNodes, start, list and stop
runs, stream a run's logs.

Each ``flwr`` CLI call is a fresh Python process that imports Flower (~1 CPU-s) to make one HTTP request, and a
server start made N + 4 of them (one ``flwr supernode register`` per institution, ``flwr ls`` twice, ``flwr
stop``, ``flwr run``). These are the same requests, built from Flower's own client (``ControlHttpClient``), request
messages, FAB builder, config parser, log streamer and interceptors exactly as ``flwr supernode register`` /
``unregister`` / ``ls`` / ``stop`` / ``run --stream`` send them, over one connection.

Flower is imported when a :class:`SuperLinkControl` is made, not at the top: ``common`` is imported by every
process of the project and most never talk to a SuperLink.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ControlError(RuntimeError):
    """A Control API request failed; the message is Flower's (``[code: N] ...``) or the transport's."""


@dataclass(frozen=True)
class RunInfo:
    """One run as ``flwr ls`` lists it."""

    run_id: str
    status: str
    """``pending``, ``starting``, ``running`` or ``finished:completed`` / ``finished:failed`` / ``finished:stopped``."""
    pending_at: str
    """When it was submitted (``YYYY-MM-DD HH:MM:SS...Z``: sorts as time)."""


class SuperLinkControl:
    """A Control API connection to the SuperLink at ``address`` (TLS with ``root_certificates``, else plain)."""

    def __init__(self, address: str, root_certificates: Path | None) -> None:
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

        self.address = address
        self._client = ControlHttpClient.from_server_address(
            server_address=address, insecure=root_certificates is None,
            root_certificates=str(root_certificates) if root_certificates is not None else None,
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])

    def __enter__(self) -> SuperLinkControl:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def register_node(self, public_key_file: Path) -> int:
        """Register the OpenSSH EC public key in ``public_key_file``; its new SuperNode id. A key already
        registered raises :class:`ControlError` with Flower's "Public key already in use"."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        try:
            key = serialization.load_ssh_public_key(public_key_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise ControlError(f"{public_key_file}: not an OpenSSH public key ({exc})") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ControlError(f"{public_key_file}: expected an EC (NIST curve) public key, got {type(key).__name__}")
        response = self._call("RegisterNode", RegisterNodeRequest(public_key=public_key_to_bytes(key)))
        if not response.node_id:
            raise ControlError(f"the SuperLink did not register {public_key_file}")
        return int(response.node_id)

    def unregister_node(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest  # pylint: disable=E0611

        self._call("UnregisterNode", UnregisterNodeRequest(node_id=node_id))

    def list_runs(self) -> list[RunInfo]:
        """Every run the SuperLink holds, oldest first."""
        from flwr.cli.run_utils import format_runs
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

        response = self._call("ListRuns", ListRunsRequest())
        rows = format_runs([run_from_proto(p) for p in response.run_dict.values()], response.now)
        return sorted((RunInfo(str(r.run_id), r.status_text, r.pending_at) for r in rows), key=lambda r: r.pending_at)

    def start_run(self, app: Path, run_config: str = "", federation_config: str = "") -> int:
        """Submit the app directory ``app`` as ``flwr run APP --run-config RUN_CONFIG --federation-config
        FEDERATION_CONFIG`` does (both in the CLI's ``key=value ...`` syntax, parsed by Flower's own parser); the
        new run's id. Prints the CLI's "Successfully started run N" line (operators and tests look for it)."""
        import hashlib

        from flwr.cli.build import build_fab_from_disk
        from flwr.common.config import parse_config_args
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=E0611
        from flwr.supercore.fab import Fab
        from flwr.supercore.utils import simulation_config_from_json

        with _cli_errors("StartRun", self.address):
            fab_bytes = build_fab_from_disk(app)
            federation = {k.replace("-", "_"): v for k, v in parse_config_args([federation_config]).items()}
            request = StartRunRequest(
                fab=fab_to_proto(Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})),
                override_config=user_config_to_proto(parse_config_args([run_config] if run_config else None)),
                federation="", app_spec="",
                override_federation_config=simulation_config_from_json(federation) if federation else None)
        response = self._call("StartRun", request)
        if not response.HasField("run_id"):
            raise ControlError(f"the SuperLink at {self.address} did not start the run")
        print(f"Successfully started run {response.run_id}", flush=True)
        return int(response.run_id)

    def stream_logs(self, run_id: int) -> None:
        """Print the run's log as it is written, until the run has finished (``flwr run --stream``, Flower's own
        streamer)."""
        from flwr.cli.log import start_stream

        with _cli_errors("StreamLogs", self.address):
            start_stream(run_id, self._client)

    def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest  # pylint: disable=E0611

        if not self._call("StopRun", StopRunRequest(run_id=run_id)).success:
            raise ControlError(f"the SuperLink did not stop run {run_id}")

    def _call(self, method: str, request: Any) -> Any:
        """``method`` with Flower's error text on failure, as the CLI shows it."""
        import httpx
        from flwr.supercore.error import FlowerError

        try:
            return getattr(self._client, method)(request)
        except httpx.HTTPStatusError as exc:
            error = FlowerError.from_json(exc.response.text)
            said = (" ".join(x for x in (f"[code: {error.code}]", error.message, error.public_details) if x)
                    if error else f"HTTP {exc.response.status_code}: {exc.response.text[:300]}")
            raise ControlError(f"{method} at {self.address}: {said}") from exc
        except httpx.HTTPError as exc:
            raise ControlError(f"{method} at {self.address}: {exc!r}") from exc


@contextlib.contextmanager
def _cli_errors(method: str, address: str) -> Iterator[None]:
    """Flower's CLI helpers (FAB builder, config parser, log streamer) report failures as ``click.ClickException``
    with a user-facing message, the FAB builder also as ``ValueError`` / ``OSError`` (no ``pyproject.toml``, an
    unreadable file): raised here as :class:`ControlError`, like every other failure of this module."""
    import click

    try:
        yield
    except click.ClickException as exc:
        raise ControlError(f"{method} at {address}: {exc.format_message()}") from exc
    except (ValueError, OSError) as exc:
        raise ControlError(f"{method} at {address}: {exc}") from exc


def run_to_end(address: str, root_certificates: Path | None, app: Path, run_config: str = "",
               federation_config: str = "") -> tuple[str, str, str]:
    """``flwr run APP --stream`` from this process (:meth:`SuperLinkControl.start_run`, then
    :meth:`SuperLinkControl.stream_logs` until the run has finished), then the newest run's (id, status) as
    :func:`last_run_status` reads it, and why the run could not be submitted or followed ("" when it could).
    Never raises a :class:`ControlError`: the status says how the run ended (``flwr run`` exits 0 on a failed run)."""
    problem = ""
    try:
        with SuperLinkControl(address, root_certificates) as control:
            control.stream_logs(control.start_run(app, run_config, federation_config))
    except ControlError as exc:
        problem = str(exc)
    return (*last_run_status(address, root_certificates), problem)


def last_run_status(address: str, root_certificates: Path | None) -> tuple[str, str]:
    """(run id, status) of the newest run on the SuperLink; never raises (the status then says why it is
    unknown), since it is asked after the run, to report how it ended."""
    try:
        with SuperLinkControl(address, root_certificates) as control:
            runs = control.list_runs()
    except ControlError as exc:
        return "", f"unknown ({exc})"
    if not runs:
        return "", "unknown (no run listed)"
    return runs[-1].run_id, runs[-1].status
