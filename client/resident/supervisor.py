"""``finlora client``'s side of the resident trainer: start the process, wait until it answers, restart it when it
dies (backing off), relay its output, stop it with everything it started."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from finlora.client.resident.protocol import (MAX_SOCKET_PATH, STARTUP_TIMEOUT_S, TrainerStartError, TrainerUnavailable,
                                              ping, private_dir, write_authkey)
from finlora.common.config import PROJECT_ROOT
from finlora.common.flower_processes import stop_process_tree

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
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    def _spawn(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "finlora.client.resident", "--socket", str(self.socket_path),
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
