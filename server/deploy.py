"""``finlora server``: the operator's side of a real federation, on Flower's own SuperLink.

Starts ``flower-superlink`` (TLS and SuperNode authentication on unless ``--insecure``; runtime dependency
installation off), registers the institutions' SuperNode public keys, submits the finlora app with the run
config, streams Flower's log, and stops the SuperLink at the end. Everything lives under the state directory;
restarted with the same state directory, the run resumes from its last completed round. Exit code 0 only
when Flower reports the run completed (``flwr run`` itself exits 0 on a failed run).
"""

from __future__ import annotations

import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import PROJECT_ROOT, ConfigError, flatten_table, load_config
from common.flower_processes import (flower_bin, flower_env, last_run_status, stop_process_tree, toml_value,
                                     wait_superlink_healthy)
from common.logs import get_logger

log = get_logger(__name__)
CONNECTION = "finlora-server"


@dataclass(frozen=True)
class ServerOptions:
    """What ``finlora server`` was asked to do."""

    state: Path
    config_file: Path | None
    certs: Path
    nodes: Path | None
    host: str
    port: int
    insecure: bool
    run_id: str


def read_run_config(path: Path | None) -> dict[str, Any]:
    """Flat run-config overrides from a TOML file (dotted keys or tables), checked against the config tree."""
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"{path}: run config file not found")
    try:
        flat = flatten_table(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    load_config(flat)  # unknown keys and wrong types fail here, naming the key
    return flat


def run_server(opts: ServerOptions) -> int:
    state = opts.state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    overrides = read_run_config(opts.config_file)
    run_dir = state / "runs" / opts.run_id
    resume = (run_dir / "metrics.jsonl").exists()
    overrides.update({"out-dir": str(state / "runs"), "run-id": opts.run_id, "resume": resume})
    if overrides.get("zk.enabled", load_config().zk.enabled) and not overrides.get("zk.keys-dir"):
        if opts.nodes is None:
            raise ConfigError("zk is on: --nodes DIR must hold the institutions' <name>.pub.pem signing keys")
        overrides["zk.keys-dir"] = str(opts.nodes.resolve())
    cfg = load_config(overrides)
    env = flower_env(state / "flwr-home", opts.port)
    ca = None if opts.insecure else (opts.certs / "ca.crt").resolve()
    cmd = [flower_bin("flower-superlink"), "--host", opts.host, "--port", str(opts.port),
           "--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation",
           "--log-file", str(state / "superlink.log")]
    if opts.insecure:
        cmd.append("--insecure")
    else:
        for name in ("ca.crt", "server.pem", "server.key"):
            if not (opts.certs / name).is_file():
                raise ConfigError(f"{opts.certs / name} not found: make it with 'finlora certs init --out {opts.certs}'")
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str((opts.certs / "server.pem").resolve()),
                "--ssl-keyfile", str((opts.certs / "server.key").resolve()), "--enable-supernode-auth"]
    connection = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{opts.port}"\n'
    connection += "insecure = true\n" if opts.insecure else f'root-certificates = "{ca}"\n'
    (state / "flwr-home").mkdir(parents=True, exist_ok=True)
    (state / "flwr-home" / "config.toml").write_text(connection)
    print(f"finlora server: SuperLink on {opts.host}:{opts.port} ({'INSECURE' if opts.insecure else 'TLS + node auth'})"
          f", run {opts.run_id}{' (resuming)' if resume else ''}, {cfg.num_rounds} rounds, state {state}", flush=True)
    superlink = subprocess.Popen(cmd, cwd=state, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
    try:
        wait_superlink_healthy(opts.port, superlink, state / "superlink.log", ca_cert=ca)
        registered = 0 if opts.insecure else _register_nodes(opts.nodes, env, state)
        print(f"finlora server: ready, {registered} institution keys registered; waiting for institutions",
              flush=True)
        overrides_text = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
        proc = subprocess.run([flower_bin("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--stream",
                               "--run-config", overrides_text], cwd=state, env=env, check=False)
        run_id, status = last_run_status(env, state, CONNECTION)
    finally:
        stop_process_tree(superlink)
    ok = status.endswith("completed") and proc.returncode == 0
    print(f"finlora server: Flower run {run_id or '?'} {status}; outputs in {run_dir}", flush=True)
    return 0 if ok else 1


def _register_nodes(nodes: Path | None, env: dict[str, str], state: Path) -> int:
    """Register every ``<name>.auth.pub`` (OpenSSH) in ``nodes`` with the running SuperLink."""
    keys = sorted(nodes.glob("*.auth.pub")) if nodes else []
    if not keys:
        raise ConfigError(f"no institution keys (*.auth.pub) in {nodes}: with node authentication on, only "
                          f"registered institutions can connect ('finlora certs node' makes them)")
    for key in keys:
        out = subprocess.run([flower_bin("flwr"), "supernode", "register", str(key.resolve()), CONNECTION],
                             cwd=state, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise ConfigError(f"registering {key} failed: {out.stdout.strip()[-300:]} {out.stderr.strip()[-300:]}")
        log.info("registered institution key %s", key.name)
    return len(keys)
