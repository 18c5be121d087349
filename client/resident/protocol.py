"""The resident trainer's protocol, both ends: keys, the socket's request and reply, errors carried across it, and
the ClientApp's side (:func:`call_trainer`, :func:`ping`). Standard library only (plus atomic file writes): the
ClientApp process that calls the trainer never imports torch for it.

``multiprocessing.connection`` with an HMAC challenge on a random key, one request per connection, one request at
a time since the trainer owns the GPU::

    request  (kind, content, context)         kind: "train" | "evaluate" | "ping"
    reply    ("ok", reply_content, context.state)
             ("error", pickled_exception | None, description)

The exception is pickled on its own so that the ClientApp re-raises the same class with the same message (the
server recognises ``PrivacyBudgetExhausted`` in Flower's error reason); one that does not survive pickling comes
back as a ``RuntimeError`` carrying its type, message and traceback.
"""

from __future__ import annotations

import os
import pickle
import secrets
import stat
import time
import traceback
from collections.abc import Mapping
from multiprocessing.connection import AuthenticationError, Client, Connection
from pathlib import Path
from typing import Any

from finlora.common.io import atomic_write_private

TASK_KINDS = ("train", "evaluate")
AUTHKEY_BYTES = 32
CONNECT_WAIT_S = 15.0
"""How long the ClientApp keeps trying to reach the trainer (covers a restart by ``finlora client``)."""
STARTUP_TIMEOUT_S = 60.0
HANDSHAKE_TIMEOUT_S = 10.0
"""How long a new connection may take to authenticate before the trainer drops it (one request at a time: a
peer that connects and then sends nothing must not hold the trainer)."""
MAX_SOCKET_PATH = 100
"""AF_UNIX paths are limited to 107 bytes on Linux; a longer state directory gets its socket in a temp dir."""


class TrainerUnavailable(RuntimeError):
    """The ClientApp could not hand its task to the resident trainer (not running, wrong key, died mid-task)."""


class TrainerStartError(RuntimeError):
    """``finlora client`` could not start its resident trainer."""


class RemoteTraceback(Exception):
    """The trainer-side traceback, chained as the cause of an exception re-raised in the ClientApp."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def write_authkey(path: Path) -> bytes:
    """A fresh random key, written atomically with mode 0600 (never readable by anyone else, even briefly)."""
    key = secrets.token_hex(AUTHKEY_BYTES).encode()
    atomic_write_private(path, key)
    return key


def read_authkey(path: Path) -> bytes:
    """The trainer's key; refuses a file that others can read (the key is what stops other local users)."""
    try:
        info = path.stat()
        key = path.read_bytes().strip()
    except OSError as exc:
        raise TrainerUnavailable(f"{path}: cannot read the resident trainer's key ({exc.strerror or exc})") from exc
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise TrainerUnavailable(f"{path}: the resident trainer's key is readable by others "
                                 f"(mode {stat.S_IMODE(info.st_mode):o}); it must be 0600")
    if len(key) < 16:
        raise TrainerUnavailable(f"{path}: the resident trainer's key is empty or too short")
    return key


def authkey_path(socket_path: str | Path, node_config: Mapping[str, Any] | None = None) -> Path:
    """Where the key of the trainer at ``socket_path`` is: ``trainer-authkey-file`` in the node config, else
    ``authkey`` beside the socket."""
    configured = str((node_config or {}).get("trainer-authkey-file", "") or "")
    return Path(configured) if configured else Path(socket_path).parent / "authkey"


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check an existing one is ours and private."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if path.stat().st_uid != os.getuid():
        raise TrainerStartError(f"{path}: socket directory is owned by another user")
    return path


def error_reply(exc: BaseException) -> tuple[str, bytes | None, str]:
    """``("error", pickled exception or None, description)``: the exception itself when it survives a pickle round
    trip as the same class with the same message, and always a text form (type, message, traceback)."""
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    tb = "".join(traceback.format_exception(exc))
    text = f"{name}: {exc} (raised in the resident trainer)\n{tb}"
    try:
        blob: bytes | None = pickle.dumps(exc)
        back = pickle.loads(blob)
        if type(back) is not type(exc) or str(back) != str(exc):
            blob = None
    except Exception:  # noqa: BLE001 - anything a custom exception's pickling may raise
        blob = None
    return "error", blob, text


def raise_error_reply(blob: bytes | None, text: str) -> None:
    """Re-raise what :func:`error_reply` packed: the original class if it unpickles here, else a RuntimeError."""
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:  # noqa: BLE001 - its class may not exist or not import on this side
            exc = None
    if not isinstance(exc, BaseException):
        raise RuntimeError(text)
    raise exc from RemoteTraceback(text)


def _connect(socket_path: str, authkey: bytes, wait_s: float) -> Connection:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Client(socket_path, family="AF_UNIX", authkey=authkey)
        except AuthenticationError as exc:
            raise TrainerUnavailable(f"the resident trainer at {socket_path} refused the key in its key file "
                                     f"(restarted with a new key? restart `finlora client`)") from exc
        except (FileNotFoundError, ConnectionRefusedError, EOFError) as exc:
            if time.monotonic() >= deadline:
                raise TrainerUnavailable(
                    f"resident trainer not reachable at {socket_path} ({type(exc).__name__}: {exc}): the resident "
                    f"trainer of `finlora client` is not running (start the institution with `finlora client`, "
                    f"or leave `trainer-socket` out of the node config to train in the ClientApp)") from exc
            time.sleep(0.2)


def call_trainer(socket: str | Path, kind: str, content: Any, context: Any,
                 wait_s: float = CONNECT_WAIT_S) -> tuple[Any, Any]:
    """Run ``client.tasks.TASKS[kind](content, context)`` in the resident trainer; ``(reply content, context.state)``.

    Re-raises the task's own exception (same class, same message). :class:`TrainerUnavailable` when the trainer
    cannot be reached within ``wait_s`` seconds, refuses the key, or dies during the task."""
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind '{kind}' (expected one of {TASK_KINDS})")
    socket_path = str(socket)
    authkey = read_authkey(authkey_path(socket_path, getattr(context, "node_config", None)))
    reply = _request(socket_path, authkey, (kind, content, context), wait_s, what=f"the {kind} task")
    status = reply[0]
    if status == "ok":
        return reply[1], reply[2]
    raise_error_reply(reply[1], reply[2])
    raise AssertionError("unreachable")


def ping(socket_path: str | Path, authkey: bytes, wait_s: float = 0.0) -> dict[str, Any]:
    """The trainer's ``{"pid", "tasks", "base-model-loads"}``; raises :class:`TrainerUnavailable` if it does not
    answer."""
    reply = _request(str(socket_path), authkey, ("ping", None, None), wait_s, what="a ping")
    if reply[0] != "ok":
        raise_error_reply(reply[1], reply[2])
    return dict(reply[1])


def _request(socket_path: str, authkey: bytes, request: tuple[Any, ...], wait_s: float, what: str) -> tuple[Any, ...]:
    payload = pickle.dumps(request)
    with _connect(socket_path, authkey, wait_s) as conn:
        try:
            conn.send_bytes(payload)
            blob = conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise TrainerUnavailable(f"the resident trainer at {socket_path} exited during {what} (finlora client "
                                     f"restarts it; see its output)") from exc
    return pickle.loads(blob)
