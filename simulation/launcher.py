"""Run the finlora Flower app in Flower's simulation engine (Ray), cleanly, from one call.

What ``flwr run`` alone gets wrong for us (see shared/notes/flower-1.42.md), and what this module does:

* the auto-started local SuperLink outlives the run and its cwd lands first on ``sys.path`` of the Ray
  actors. Here we start ``flower-superlink --simulation`` ourselves, in a fresh neutral working directory,
  on free loopback ports, in its own process group, and stop it and every descendant (Ray included) at
  the end, whatever happened;
* the SuperLink would ``uv sync`` the project's dependencies for every run: switched off;
* ``flwr run --stream`` exits 0 when the ServerApp failed: we ask ``flwr ls --format json`` for the run's
  status and report failure with a non-zero exit;
* ``FLWR_HOME`` is private to the run (telemetry and update checks off), so nothing is read from or
  written to the user's Flower configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import PROJECT_ROOT

CONNECTION = "finlora-sim"
STARTUP_TIMEOUT_S = 60.0


class SimulationError(RuntimeError):
    """The simulation could not be started, or its run did not finish successfully."""


@dataclass(frozen=True)
class SimulationResult:
    """How the Flower run ended."""

    run_id: str
    status: str
    returncode: int
    workdir: Path

    @property
    def ok(self) -> bool:
        return self.status.endswith("completed") or self.status.endswith("finished:completed")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, http_port: int) -> dict[str, str]:
    """Environment for every Flower process of the run."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        # Flower spawns flower-superexec, flwr-serverapp and flwr-simulation by name.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "RAY_DEDUP_LOGS": "0",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1" if env.get("FINLORA_ONLINE") != "1" else "0"),
    })
    return env


def toml_value(value: Any) -> str:
    """A run-config value as TOML (what ``flwr run --run-config`` parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _bin(name: str) -> str:
    """A Flower executable from the same environment as this Python (works inside un-activated venvs)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def _wait_healthy(port: int, proc: subprocess.Popen, log_path: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SimulationError(f"flower-superlink did not become healthy within {STARTUP_TIMEOUT_S:.0f}s; see {log_path}")


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a process, its process group and every descendant (Ray's raylet, GCS and workers included)."""
    import psutil

    procs = _descendants(proc.pid)
    try:
        procs.append(psutil.Process(proc.pid))
    except psutil.NoSuchProcess:
        pass
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=grace_s)


def run_simulation(num_supernodes: int, run_config: Mapping[str, Any], app_dir: Path = PROJECT_ROOT,
                   cpus_per_client: float = 1.0, gpus_per_client: float = 0.0, stream: bool = True, workdir: Path | None = None,
                   log_to: Any = None) -> SimulationResult:
    """Run the app once in the simulation engine; returns the run's final status (never raises on a failed run).

    ``run_config`` holds flat dotted keys overriding ``[tool.flwr.app.config]``.
    """
    own_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="finlora-sim-"))
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    env = flower_env(flwr_home, http_port)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = ":local:"\n')
    superlink_log = workdir / "superlink.log"
    superlink = subprocess.Popen(  # noqa: S603 - fixed argv
        [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(http_port), "--database", str(workdir / "state.db"),
         "--disable-runtime-dependency-installation", "--log-file", str(superlink_log)],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_healthy(http_port, superlink, superlink_log)
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        cmd = [_bin("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream", "--federation-config",
               f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client:g} "
               f"client-resources-num-gpus={gpus_per_client:g}"]
        if overrides:
            cmd += ["--run-config", overrides]
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=log_to, stderr=subprocess.STDOUT if log_to else None,
                              check=False)
        run_id, status = _last_run_status(env, workdir)
        return SimulationResult(run_id=run_id, status=status, returncode=proc.returncode, workdir=workdir)
    finally:
        stop_process_tree(superlink)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _last_run_status(env: Mapping[str, str], workdir: Path) -> tuple[str, str]:
    """(run id, status) of the newest run on the SuperLink, via ``flwr ls --format json``."""
    out = subprocess.run([_bin("flwr"), "ls", CONNECTION, "--format", "json"], cwd=workdir, env=dict(env),
                         capture_output=True, text=True, check=False)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return "", f"unknown (flwr ls said: {out.stdout.strip()[:200]} {out.stderr.strip()[:200]})"
    if not runs:
        return "", "unknown (no run listed)"
    newest = max(runs, key=lambda r: str(r.get("created-at", "")))
    return str(newest.get("run-id", "")), str(newest.get("status", "unknown"))


def command_line(args: Sequence[str]) -> str:
    return " ".join(args)
