"""The resident trainer process itself (``python -m finlora.client.resident``): it authenticates each connection, runs
the task in this long-lived process (whose module caches keep the base model and the tokenized data between rounds),
and replies. One request at a time; a peer that fails authentication in any way is dropped with one log line.

    python -m finlora.client.resident --socket P --authkey-file F [--exit-with-parent]
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import AuthenticationError, Connection, Listener, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

from finlora.client.local_data import LOCAL_DATA_CACHE
from finlora.client.resident.protocol import (HANDSHAKE_TIMEOUT_S, TASK_KINDS, TrainerStartError, TrainerUnavailable,
                                              error_reply, private_dir, read_authkey, write_authkey)
from finlora.common.config import FinloraConfig
from finlora.common.logs import get_logger
from finlora.common.model import LOAD_COUNTS, MODEL_CACHE

class _Trainer:
    """What the trainer process holds between requests (the model itself lives in the module caches)."""

    def __init__(self, log: Any, preload: threading.Thread | None = None) -> None:
        self.log = log
        self.tasks = 0
        self.resident_key: Any = None
        self.preload = preload

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "tasks": self.tasks, "base-model-loads": LOAD_COUNTS["base_model_loads"]}

    def run(self, kind: str, content: Any, context: Any) -> tuple[Any, ...]:
        if kind == "ping":
            return "ok", self.info(), None
        if kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind '{kind}' (expected one of {TASK_KINDS})")
        if self.preload is not None:  # never import the same heavy modules from two threads at once
            self.preload.join()
            self.preload = None
        from finlora.client.tasks import TASKS  # after the preload thread: it imports flwr, torch and the model code

        self._keep_one_model(context)
        reply = TASKS[kind](content, context)
        self.tasks += 1
        return "ok", reply, context.state

    def _keep_one_model(self, context: Any) -> None:
        """One base model resident at a time: a run with another model or LoRA setting replaces it (on a GPU two
        8B models would not fit, and the old one would never be used again)."""
        cfg = FinloraConfig.from_flat(context.run_config)
        key = (cfg.model, cfg.lora)
        if self.resident_key is not None and key != self.resident_key and MODEL_CACHE:
            self.log.info("resident trainer: new model/LoRA settings, releasing the resident model")
            MODEL_CACHE.clear()
            LOCAL_DATA_CACHE.clear()
            _release_memory()
        self.resident_key = key


def _release_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _remove_stale_socket(socket_path: Path) -> None:
    """Remove a socket file left by a dead trainer; refuse to steal one that a live trainer still serves."""
    if not socket_path.exists() and not socket_path.is_symlink():
        return
    if not stat.S_ISSOCK(socket_path.lstat().st_mode):
        raise TrainerStartError(f"{socket_path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(socket_path))
    except (ConnectionRefusedError, FileNotFoundError):
        socket_path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise TrainerStartError(f"another resident trainer is already serving at {socket_path}")


def _authenticate(conn: Connection, authkey: bytes, timeout_s: float) -> None:
    """``multiprocessing``'s HMAC challenge in both directions, within ``timeout_s`` seconds.

    Raises whatever a malformed or hostile peer provokes (``AuthenticationError``, ``OSError`` for a bad length
    prefix or a truncated frame, ``EOFError``, ...); the caller drops the connection. On timeout the socket is shut
    down, so the blocked read returns end-of-file."""
    lock, done, expired = threading.Lock(), [False], [False]

    def expire() -> None:
        with lock:
            if done[0]:
                return
            expired[0] = True
            try:
                with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        deliver_challenge(conn, authkey)
        answer_challenge(conn, authkey)
    except Exception as exc:  # noqa: BLE001 - re-raised, as a timeout when the timer cut the connection
        if expired[0]:
            raise TimeoutError(f"no valid handshake within {timeout_s:g} s") from exc
        raise
    finally:
        with lock:  # after this the timer never touches the descriptor (which the caller may close and reuse)
            done[0] = True
        timer.cancel()


def _serve_one(conn: Connection, trainer: _Trainer, on_task: Callable[[str, float, dict[str, Any]], None]) -> None:
    try:
        kind, content, context = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return  # the ClientApp went away before asking
    except Exception as exc:  # noqa: BLE001 - an undecodable request is answered, not fatal
        _send(conn, error_reply(exc), trainer)
        return
    start = time.perf_counter()
    try:
        reply: tuple[Any, ...] = trainer.run(kind, content, context)
        payload = pickle.dumps(reply)
    except Exception as exc:  # noqa: BLE001 - every task failure goes back to the ClientApp
        if "out of memory" in str(exc).lower():
            _release_memory()
        reply = error_reply(exc)
        payload = pickle.dumps(reply)
    if kind in TASK_KINDS:
        on_task(kind, time.perf_counter() - start, {**trainer.info(), "status": reply[0]})
    _send(conn, payload, trainer)


def _send(conn: Connection, payload: bytes | tuple[Any, ...], trainer: _Trainer) -> None:
    try:
        conn.send_bytes(payload if isinstance(payload, bytes) else pickle.dumps(payload))
    except OSError:
        trainer.log.warning("resident trainer: the ClientApp went away before the reply (its task was run)")


def serve(socket_path: Path, authkey_file: Path, *, max_requests: int | None = None,
          on_task: Callable[[str, float, dict[str, Any]], None] | None = None,
          preload: threading.Thread | None = None, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Serve tasks on ``socket_path`` until killed (or ``max_requests`` connections), one at a time.

    The key is read from ``authkey_file`` (created, 0600, if missing); the socket's directory is made 0700.
    ``preload``: a thread importing the heavy libraries, joined before the first task. A connection that fails
    authentication in any way (wrong key, garbage, a truncated frame, an absurd length prefix, silence for
    ``handshake_timeout_s``) is dropped with one log line; the trainer goes on serving."""
    log = get_logger(__name__)
    socket_path = Path(socket_path)
    private_dir(socket_path.parent)
    authkey = read_authkey(authkey_file) if authkey_file.exists() else write_authkey(authkey_file)
    _remove_stale_socket(socket_path)
    trainer = _Trainer(log, preload)

    def summary(kind: str, seconds: float, info: dict[str, Any]) -> None:
        log.info("resident trainer: %s %s in %.2f s (pid %d, tasks %d, base-model loads so far %d)", kind,
                 "done" if info["status"] == "ok" else "FAILED", seconds, info["pid"], info["tasks"],
                 info["base-model-loads"])

    report = on_task or summary
    served = 0
    # No authkey on the Listener: its accept() would run the handshake itself, unbounded in time, and let a
    # malformed frame's exception (OSError "bad message length", AssertionError, ...) end the trainer.
    with Listener(str(socket_path), family="AF_UNIX", backlog=16) as listener:
        os.chmod(socket_path, 0o600)
        log.info("resident trainer: pid %d listening on %s", os.getpid(), socket_path)
        while max_requests is None or served < max_requests:
            try:
                conn = listener.accept()
            except OSError as exc:  # e.g. too many open files: wait, do not spin or die
                log.warning("resident trainer: accept failed (%s)", exc)
                time.sleep(0.5)
                continue
            with conn:
                try:
                    _authenticate(conn, authkey, handshake_timeout_s)
                except AuthenticationError:
                    log.warning("resident trainer: refused a connection with a wrong key")
                    continue
                except (EOFError, ConnectionError):
                    continue  # a peer that left before the handshake (e.g. a readiness probe)
                except Exception as exc:  # noqa: BLE001 - anything an unauthenticated peer sends is dropped
                    log.warning("resident trainer: dropped a connection with a malformed handshake (%s: %s)",
                                type(exc).__name__, exc)
                    continue
                served += 1
                _serve_one(conn, trainer, report)


def _preload() -> None:
    """Import the heavy libraries while waiting for the first message (they are needed for every task)."""
    import importlib

    for name in ("torch", "transformers", "peft", "opacus"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the first task that needs it reports a real import problem
            pass


def _exit_with_parent() -> None:
    """Leave when ``finlora client`` is gone, even if it was killed without a chance to stop us."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finlora.client.resident",
                                     description="finlora's resident trainer (finlora client starts it)")
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on (its directory becomes 0700)")
    parser.add_argument("--authkey-file", required=True, help="key file (0600); created if missing")
    parser.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process exits")
    parser.add_argument("--no-preload", action="store_true", help="do not import torch/transformers before a task")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT_S,
                        help="seconds a new connection may take to authenticate (default: %(default)s)")
    args = parser.parse_args(argv)
    import flwr.common.logger  # noqa: F401 - gives the "flwr" logger (and so ours) its console handler

    # Opacus calls logging.basicConfig on import; without this every line of ours would be printed twice.
    logging.getLogger("flwr").propagate = False

    # SIGTERM unwinds (so the listener removes its socket file) instead of killing the process outright.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.exit_with_parent:
        _exit_with_parent()
    preload = None
    if not args.no_preload:
        preload = threading.Thread(target=_preload, name="preload", daemon=True)
        preload.start()
    try:
        serve(Path(args.socket), Path(args.authkey_file), preload=preload, handshake_timeout_s=args.handshake_timeout)
    except (TrainerStartError, TrainerUnavailable) as exc:
        print(f"resident trainer: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

