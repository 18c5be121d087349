"""The resident trainer: one long-lived process per institution that keeps the base model loaded across rounds.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message of a deployment, so without help an
institution would re-import torch and reload its base model (and re-tokenize its data) for every train and
evaluate message. ``finlora client`` therefore also starts ``python -m client.resident``, which holds the module
caches (:data:`common.model.MODEL_CACHE`, :data:`client.local_data.LOCAL_DATA_CACHE`); the ClientApp process only
hands it each task over a Unix-domain socket (``trainer-socket`` in the node config) and returns its reply.

Protocol (``multiprocessing.connection`` with an HMAC challenge on a random key, one request per connection,
one request at a time since the trainer owns the GPU)::

    request  (kind, content, context)         kind: "train" | "evaluate" | "ping"
    reply    ("ok", reply_content, context.state)
             ("error", pickled_exception | None, description)

The exception is pickled on its own so that the ClientApp re-raises the same class with the same message (the
server recognises ``PrivacyBudgetExhausted`` in Flower's error reason); one that does not survive pickling comes
back as a ``RuntimeError`` carrying its type, message and traceback.

The caller side (:func:`call_trainer`, :class:`ResidentTrainer`) imports only the standard library; torch is
imported inside the trainer process, when it runs its first task.

    python -m client.resident --socket P --authkey-file F [--exit-with-parent]
"""

from __future__ import annotations

import argparse
import os
import pickle
import secrets
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import (AuthenticationError, Client, Connection, Listener, answer_challenge,
                                        deliver_challenge)
from pathlib import Path
from typing import Any

from client.local_data import LOCAL_DATA_CACHE
from common.config import FinloraConfig, PROJECT_ROOT
from common.flower_processes import stop_process_tree
from common.io import atomic_write_private
from common.logs import get_logger
from common.model import LOAD_COUNTS, MODEL_CACHE

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


# --------------------------------------------------------------------------- keys and paths (both sides)

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


# --------------------------------------------------------------------------- errors across the socket

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


# --------------------------------------------------------------------------- ClientApp side

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
    """The trainer's ``{"pid", "tasks", "base-model-loads"}``; raises :class:`TrainerUnavailable` if it does not answer."""
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


# --------------------------------------------------------------------------- trainer side

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
        from client.tasks import TASKS  # after the preload thread: it imports flwr, torch and the model code

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
    parser = argparse.ArgumentParser(prog="python -m client.resident",
                                     description="finlora's resident trainer (finlora client starts it)")
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on (its directory becomes 0700)")
    parser.add_argument("--authkey-file", required=True, help="key file (0600); created if missing")
    parser.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process exits")
    parser.add_argument("--no-preload", action="store_true", help="do not import torch/transformers before a task")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT_S,
                        help="seconds a new connection may take to authenticate (default: %(default)s)")
    args = parser.parse_args(argv)
    import signal

    import logging

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


# --------------------------------------------------------------------------- finlora client's side

class ResidentTrainer:
    """``finlora client``'s handle on its trainer process: start it, wait for it, restart it if it dies, stop it.

    Parameters
    ----------
    state : Path
        The institution's state directory; the key file is ``state/trainer/authkey`` and the socket
        ``state/trainer/trainer.sock`` (in a private temp dir when that path is too long for AF_UNIX).
    env : dict[str, str]
        Environment of the trainer (the SuperNode's, with ``CUDA_VISIBLE_DEVICES`` for ``--gpu``).
    name : str
        Institution name, for messages.
    out : Callable[[str], None]
        Where the trainer's output lines (prefixed) and the supervisor's messages go.
    """

    def __init__(self, state: Path, env: Mapping[str, str], name: str,
                 out: Callable[[str], None] | None = None) -> None:
        self.dir = private_dir(state / "trainer")
        self.authkey_file = self.dir / "authkey"
        socket_path = self.dir / "trainer.sock"
        self._temp_dir: Path | None = None
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="finlora-trainer-"))  # 0700
            socket_path = self._temp_dir / "trainer.sock"
        self.socket_path = socket_path
        self.env = dict(env)
        self.name = name
        self.out = out or (lambda line: print(line, flush=True))
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._relays: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._authkey = b""
        self._spawned_at = 0.0

    @property
    def node_config(self) -> dict[str, str]:
        """What the SuperNode's node config needs so that the ClientApp reaches this trainer."""
        return {"trainer-socket": str(self.socket_path), "trainer-authkey-file": str(self.authkey_file)}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the trainer and wait until it answers; then keep it alive (restart on death) until :meth:`stop`."""
        self._authkey = write_authkey(self.authkey_file)  # a new key for every `finlora client`
        with self._lock:
            proc = self._spawn()
        self._wait_ready(proc)
        self._monitor = threading.Thread(target=self._watch, name="trainer-watch", daemon=True)
        self._monitor.start()

    def stop(self) -> None:
        """Stop the trainer (and anything it started); no restart after this."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            stop_process_tree(proc)
        if self._monitor is not None:
            self._monitor.join(timeout=10)
        for relay in self._relays:
            relay.join(timeout=5)
        self.socket_path.unlink(missing_ok=True)
        if self._temp_dir is not None:
            import shutil

            shutil.rmtree(self._temp_dir, ignore_errors=True)

    def _spawn(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "client.resident", "--socket", str(self.socket_path),
               "--authkey-file", str(self.authkey_file), "--exit-with-parent"]
        # cwd = the project root: `-m` puts it first on sys.path, so `client` is finlora's own package
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=self.env, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._proc = proc
        self._spawned_at = time.monotonic()
        relay = threading.Thread(target=self._relay, args=(proc,), name="trainer-output", daemon=True)
        relay.start()
        self._relays = [r for r in self._relays if r.is_alive()] + [relay]
        return proc

    def _relay(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            self.out(f"[trainer {self.name}] {line.rstrip()}")

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._stopping.is_set():
            if proc.poll() is not None:
                raise TrainerStartError(f"the resident trainer exited at start with code {proc.returncode} (its "
                                        f"output is above, prefixed [trainer {self.name}])")
            try:
                ping(self.socket_path, self._authkey)
                return
            except TrainerUnavailable:
                if time.monotonic() > deadline:
                    raise TrainerStartError(f"the resident trainer did not answer on {self.socket_path} within "
                                            f"{STARTUP_TIMEOUT_S:.0f} s") from None
                time.sleep(0.2)

    def _watch(self) -> None:
        """Restart a trainer that died while the SuperNode runs (backing off if it keeps dying at once)."""
        delay = 0.0
        while not self._stopping.wait(1.0):
            proc = self._proc
            if proc is None or proc.poll() is None:
                continue
            lived = time.monotonic() - self._spawned_at
            delay = 1.0 if lived > 60 else min(max(2 * delay, 1.0), 60.0)
            self.restarts += 1
            self.out(f"finlora client {self.name}: the resident trainer (pid {proc.pid}) exited with code "
                     f"{proc.returncode}; restarting it in {delay:.0f} s (restart {self.restarts})")
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                new = self._spawn()
            try:
                self._wait_ready(new)
                self.out(f"finlora client {self.name}: resident trainer restarted (pid {new.pid})")
            except TrainerStartError as exc:
                self.out(f"finlora client {self.name}: {exc}")

if __name__ == "__main__":
    sys.exit(main())
