"""Starting and stopping Flower's processes (SuperLink, SuperNode, ``flwr``) cleanly, for simulation and deployment.

Shared by ``finlora simulate``, ``finlora server`` and ``finlora client``: free loopback ports, the environment
every Flower process gets (private ``FLWR_HOME``, telemetry, update checks and runtime dependency installation
off), health waiting (the SuperLink, and the Fleet gateway in front of it), the hash of the app bundle (FAB) that
``flwr run`` submits, the run's final status (``flwr run`` exits 0 on a failed run), and stopping a process
with every descendant (Ray's raylet and workers, Flower's superexec) whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_S = 60.0


class FlowerProcessError(RuntimeError):
    """A Flower process could not be started or did not become healthy."""


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


def app_files(app_dir: Path) -> dict[str, Path]:
    """The files of the app in ``app_dir`` that Flower's FAB build considers, without walking ignored directories.

    Flower's own ``collect_files`` walks the whole tree, a virtual environment in the project included (55,000
    files, 6-11 s), and only then drops what ``.gitignore`` and its built-in patterns exclude. Here a directory
    that ``.gitignore`` ignores, or that Flower's built-in rules exclude whole (``.venv`` and ``.flwr`` at the top,
    ``__pycache__`` anywhere), is never entered: every file below it would be dropped by the same rules, so the
    FAB built from these files is byte for byte the one Flower builds from disk (``tests/test_fab.py``).
    """
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    root = Path(app_dir).expanduser().resolve()
    gitignore = root / ".gitignore"
    ignored = build_pathspec(load_gitignore_patterns(gitignore.read_bytes() if gitignore.is_file() else b""))
    excluded = build_pathspec(["/.venv/", "/.flwr/", "__pycache__/"])
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else f"{rel_dir}/"
        dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink()
                             and not excluded.match_file(f"{prefix}{d}/") and not ignored.match_file(f"{prefix}{d}/"))
        for name in filenames:
            path = here / name
            if not path.is_symlink() and path.resolve().is_relative_to(root):
                files[f"{prefix}{name}"] = path
    return files


def app_fab(app_dir: Path) -> bytes:
    """The FAB that ``flwr run APP_DIR`` submits, built with Flower's own builder from ``app_files``.

    Flower's FAB builds are deterministic (``flwr/cli/build.py`` writes every entry with the fixed ``FAB_DATE``,
    in a fixed order), so the operator's submitted FAB and an institution's build of the same finlora files have
    the same hash; ``finlora client --app-hash auto`` pins it.
    """
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(app_dir))[0]


def app_fab_hash(app_dir: Path) -> str:
    """SHA-256 of ``app_fab(app_dir)``: the hash the SuperLink and the institutions see."""
    import hashlib

    return hashlib.sha256(app_fab(app_dir)).hexdigest()


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the files that make up the app's FAB into ``dest`` and return it, for ``flwr run dest``.

    ``flwr run`` takes a directory and walks all of it (see ``app_files``); the staged copy holds only the app's
    own files, so Flower's walk is instant and its FAB, hence the app hash, is the one ``app_fab`` builds.
    """
    from flwr.cli.utils import filter_paths_for_publish

    for rel, src in filter_paths_for_publish(app_files(app_dir)).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return dest


def flower_bin(name: str) -> str:
    """A Flower executable from the same environment as this Python (works inside un-activated venvs)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def wait_superlink_healthy(port: int, proc: subprocess.Popen, log_path: Path, ca_cert: Path | None = None) -> None:
    """Poll the SuperLink's ``/health`` (over TLS with ``ca_cert``) until it answers or the process dies."""
    import ssl
    import urllib.request

    scheme, context = ("https", ssl.create_default_context(cafile=str(ca_cert))) if ca_cert else ("http", None)

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerProcessError(f"flower-superlink exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=0.5, context=context) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise FlowerProcessError(f"flower-superlink did not become healthy within {STARTUP_TIMEOUT_S:.0f}s; see {log_path}")


def wait_gateway_ready(host: str, port: int, proc: subprocess.Popen, log_path: Path,
                       ca_cert: Path | None = None) -> None:
    """Wait until the Fleet gateway on ``host:port`` answers a Fleet call with the SuperLink's own answer.

    A POST to ``/v1/fleet/get-run`` without node credentials must cross the gateway (TLS verified against the
    federation's ``ca_cert``; the host name is not checked, the certificate names the public address) and be
    refused by the SuperLink itself (401 with node auth on): any answer other than the gateway's own 404 or its
    503 (SuperLink unreachable) proves the whole path.
    """
    import ssl
    import urllib.error
    import urllib.request

    target = "127.0.0.1" if host in ("0.0.0.0", "", "::", "[::]") else host
    target = f"[{target}]" if ":" in target and not target.startswith("[") else target
    context = None
    if ca_cert is not None:
        context = ssl.create_default_context(cafile=str(ca_cert))
        context.check_hostname = False  # the chain is verified; the certificate names the public host, not this one
    scheme = "https" if ca_cert else "http"
    request = urllib.request.Request(f"{scheme}://{target}:{port}/v1/fleet/get-run", data=b"", method="POST",
                                     headers={"content-type": "application/protobuf"})
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerProcessError(f"the Fleet gateway exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            last = str(exc)
            time.sleep(0.2)
            continue
        if status not in (404, 502, 503, 504):
            return
        last = f"HTTP {status}"
        time.sleep(0.2)
    raise FlowerProcessError(f"the Fleet gateway on {host}:{port} did not reach the SuperLink within "
                             f"{STARTUP_TIMEOUT_S:.0f}s ({last}); see {log_path}")


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _terminate_then_kill(procs: list[Any], grace_s: float) -> None:
    """SIGTERM every psutil process, wait up to ``grace_s``, SIGKILL the ones still alive."""
    import psutil

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
    _terminate_then_kill(procs, grace_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=grace_s)


def stop_leftover_process(pid_file: Path, must_contain: tuple[str, ...], grace_s: float = 10.0) -> bool:
    """Stop (with its descendants) the process recorded in ``pid_file`` if it is still alive and its command
    line contains every string of ``must_contain`` (a recycled pid is left alone). True if one was stopped."""
    import psutil

    try:
        pid = int(pid_file.read_text().strip())
        proc = psutil.Process(pid)
        cmdline = " ".join(proc.cmdline())
    except (OSError, ValueError, psutil.Error):
        return False
    if not all(text in cmdline for text in must_contain):
        return False
    procs = [proc, *_descendants(pid)]
    _terminate_then_kill(procs, grace_s)
    return True


def die_with_parent() -> None:
    """``preexec_fn`` for a child that must not outlive the ``finlora`` process that started it, even when that
    process is SIGKILLed (no ``finally`` runs then): Linux sends the child SIGTERM when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``; it fires when the *thread* that started the child ends, so start such children
    from the main thread only). Elsewhere a no-op; the normal paths stop children explicitly."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
