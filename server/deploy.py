"""``finlora server``: the operator's side of a real federation, on Flower's own SuperLink.

Starts ``flower-superlink`` (TLS and SuperNode authentication on unless ``--insecure``; runtime dependency
installation off), registers the institutions' SuperNode public keys, submits the finlora app with the run
config, streams Flower's log, and stops the SuperLink at the end. Everything lives under the state directory;
restarted with the same state directory, the run resumes from its last completed round. Exit code 0 only
when Flower reports the run completed (``flwr run`` itself exits 0 on a failed run).

Restarting after a crash (``kill -9``, a lost machine) is safe: a SuperLink left running on the state directory
is stopped first, keys already registered in the persisted SuperLink database are recognised (Flower answers
"Public key already in use"), an institution whose key left ``--nodes`` is unregistered, and runs the dead
server left unfinished are stopped (which also drops their undelivered messages, so institutions do not train
for a run nobody listens to) before the resumed run is submitted.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import PROJECT_ROOT, ConfigError, flatten_table, load_config
from common.flower_processes import (flower_bin, flower_env, last_run_status, list_runs, stop_leftover_process,
                                     stop_process_tree, toml_value, wait_superlink_healthy)
from common.io import atomic_write_text

CONNECTION = "finlora-server"
REGISTRY_FILE = "institutions.json"
"""Under the state directory: institution name -> SuperNode id and key digest, as registered with the SuperLink."""
PID_FILE = "superlink.pid"
"""Under the state directory: the running SuperLink's process id (found and stopped after a crash)."""
ALREADY_REGISTERED = "Public key already in use"


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
    app: Path | None = None


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
    pid_file = state / PID_FILE
    if stop_leftover_process(pid_file, must_contain=("flower-superlink", str(state / "superlink.db"))):
        print(f"finlora server: stopped a SuperLink left running on {state} by an earlier server process",
              flush=True)
    superlink = subprocess.Popen(cmd, cwd=state, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
    atomic_write_text(pid_file, f"{superlink.pid}\n")
    try:
        wait_superlink_healthy(opts.port, superlink, state / "superlink.log", ca_cert=ca)
        registered = 0 if opts.insecure else len(_register_nodes(opts.nodes, env, state))
        if not opts.insecure and registered < cfg.strategy.min_available_nodes:
            raise ConfigError(f"strategy.min-available-nodes is {cfg.strategy.min_available_nodes} but only "
                              f"{registered} institution keys are in {opts.nodes}: the run could never start")
        _stop_unfinished_runs(env, state)
        print(f"finlora server: ready, {registered} institution keys registered; waiting for institutions",
              flush=True)
        overrides_text = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
        proc = subprocess.run([flower_bin("flwr"), "run", str((opts.app or PROJECT_ROOT).resolve()), CONNECTION,
                               "--stream", "--run-config", overrides_text], cwd=state, env=env, check=False)
        run_id, status = last_run_status(env, state, CONNECTION)
    finally:
        stop_process_tree(superlink)
        pid_file.unlink(missing_ok=True)
    ok = status.endswith("completed") and proc.returncode == 0
    print(f"finlora server: Flower run {run_id or '?'} {status}; outputs in {run_dir}", flush=True)
    return 0 if ok else 1


def _register_nodes(nodes: Path | None, env: dict[str, str], state: Path) -> dict[str, int | None]:
    """Register every ``<name>.auth.pub`` (OpenSSH) in ``nodes`` with the running SuperLink; idempotent.

    The SuperLink database persists across restarts, so a key may be registered already: Flower then answers
    "Public key already in use" and the SuperNode id recorded in ``STATE/institutions.json`` is kept. A key
    registered earlier but no longer in ``nodes`` (an institution removed, or a key replaced) is unregistered,
    so that only the institutions in ``nodes`` can connect. Returns institution name -> SuperNode id.
    """
    keys = sorted(nodes.glob("*.auth.pub")) if nodes else []
    if not keys:
        raise ConfigError(f"no institution keys (*.auth.pub) in {nodes}: with node authentication on, only "
                          f"registered institutions can connect ('finlora certs node' makes them)")
    registry_path = state / REGISTRY_FILE
    previous: dict[str, dict[str, Any]] = json.loads(registry_path.read_text()) if registry_path.is_file() else {}
    current: dict[str, dict[str, Any]] = {}
    for key in keys:
        name = key.name.removesuffix(".auth.pub")
        digest = hashlib.sha256(key.read_bytes().strip()).hexdigest()
        out = _flwr(env, state, "supernode", "register", str(key.resolve()), CONNECTION)
        said = f"{out.stdout} {out.stderr}"
        if out.returncode == 0 and (match := re.search(r"SuperNode (\d+) registered", said)):
            node_id: int | None = int(match.group(1))
            how = "registered"
        elif ALREADY_REGISTERED in said:
            known = next((v for v in previous.values() if v.get("key_sha256") == digest), None)
            node_id, how = (known or {}).get("node_id"), "already registered"
        else:
            raise ConfigError(f"registering {key} failed: {_gist(said)}")
        current[name] = {"node_id": node_id, "key_sha256": digest}
        shown = node_id if node_id is not None else "(id not recorded)"
        print(f"finlora server: institution {name} {how} as SuperNode {shown}", flush=True)
    kept_ids = {v["node_id"] for v in current.values()}
    for name, old in previous.items():
        if old.get("node_id") is not None and old["node_id"] not in kept_ids:
            out = _flwr(env, state, "supernode", "unregister", str(old["node_id"]), CONNECTION)
            if out.returncode != 0:
                raise ConfigError(f"unregistering SuperNode {old['node_id']} (institution {name}, whose key is no "
                                  f"longer in {nodes}) failed: {_gist(out.stdout + ' ' + out.stderr)}")
            print(f"finlora server: institution {name}: its old key is no longer in {nodes}; SuperNode "
                  f"{old['node_id']} unregistered", flush=True)
    atomic_write_text(registry_path, json.dumps(current, indent=2, sort_keys=True) + "\n")
    return {name: v["node_id"] for name, v in current.items()}


def _stop_unfinished_runs(env: dict[str, str], state: Path) -> None:
    """Stop runs a crashed server left unfinished in the persisted database (Flower then drops their messages)."""
    for run in list_runs(env, state, CONNECTION):
        status = str(run.get("status", ""))
        if status and not status.startswith("finished"):
            out = _flwr(env, state, "stop", str(run.get("run-id")), CONNECTION)
            outcome = "stopped" if out.returncode == 0 else f"could not be stopped ({_gist(out.stdout + out.stderr)})"
            print(f"finlora server: Flower run {run.get('run-id')} ({status}), left unfinished by an earlier server "
                  f"process, {outcome}", flush=True)


def _flwr(env: dict[str, str], state: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([flower_bin("flwr"), *args], cwd=state, env=env, capture_output=True, text=True,
                          check=False)


def _gist(text: str, limit: int = 400) -> str:
    """Flower's CLI answer without its box drawing."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())[-limit:]
