"""Run the finlora Flower app in Flower's simulation engine (Ray), cleanly, from one call.

What ``flwr run`` alone gets wrong for us (see shared/notes/flower-1.42.md), and what this module does:

* the auto-started local SuperLink outlives the run and its cwd lands first on ``sys.path`` of the Ray
  actors. Here we start ``flower-superlink --simulation`` ourselves, in a fresh neutral working directory,
  on free loopback ports, in its own process group, and stop it and every descendant (Ray included) at
  the end, whatever happened;
* the SuperLink would ``uv sync`` the project's dependencies for every run: switched off;
* ``flwr run --stream`` exits 0 when the ServerApp failed: we ask the SuperLink's Control API for the run's
  status (what ``flwr ls`` shows) and report failure with a non-zero exit. The run is submitted and its log
  streamed from this process too, with Flower's own FAB builder, request and streamer
  (``common/flower_control.py``): no ``flwr`` CLI process, which would import Flower once more;
* ``FLWR_HOME`` is private to the run (telemetry and update checks off), so nothing is read from or
  written to the user's Flower configuration.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from finlora.common.config import PROJECT_ROOT
from finlora.common.flower_control import run_to_end
from finlora.common.flower_processes import (flower_bin, flower_env, free_port, stage_app, stop_process_tree,
                                             toml_value, wait_superlink_healthy)


@dataclass(frozen=True)
class SimulationResult:
    """How the Flower run ended."""

    run_id: str
    status: str
    problem: str
    """Why the run could not be submitted or its log followed ("" when it could)."""
    workdir: Path

    @property
    def ok(self) -> bool:
        return self.status.endswith("completed") or self.status.endswith("finished:completed")


def run_simulation(num_supernodes: int, run_config: Mapping[str, Any], app_dir: Path = PROJECT_ROOT,
                   cpus_per_client: float = 1.0, gpus_per_client: float = 0.0, workdir: Path | None = None,
                   log_to: TextIO | None = None) -> SimulationResult:
    """Run the app once in the simulation engine; returns the run's final status (never raises on a failed run).

    ``run_config`` holds flat dotted keys overriding ``[tool.flwr.app.config]``; ``log_to``, a text file the run's
    streamed log is written to instead of stdout.
    """
    own_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="finlora-sim-"))
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    env = flower_env(flwr_home, http_port)
    superlink_log = workdir / "superlink.log"
    superlink = subprocess.Popen(  # noqa: S603 - fixed argv
        [flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(http_port), "--database", str(workdir / "state.db"),
         "--disable-runtime-dependency-installation", "--log-file", str(superlink_log)],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_superlink_healthy(http_port, superlink, superlink_log)
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        app = stage_app(Path(app_dir), workdir / "app")  # only the app's files: the FAB builder walks all it gets
        federation = (f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client:g} "
                      f"client-resources-num-gpus={gpus_per_client:g}")
        with contextlib.redirect_stdout(log_to or sys.stdout):
            run_id, status, problem = run_to_end(f"127.0.0.1:{http_port}", None, app, overrides, federation)
        if problem:
            print(f"finlora: the Flower run could not be started or followed: {problem}", file=sys.stderr)
        return SimulationResult(run_id=run_id, status=status, problem=problem, workdir=workdir)
    finally:
        stop_process_tree(superlink)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


