"""``finlora server``: the operator's side of a real federation, on Flower's own SuperLink.

Starts ``flower-superlink`` (TLS and SuperNode authentication on unless ``--insecure``; runtime dependency
installation off) **on 127.0.0.1 only**, on an internal port, and in front of it the Fleet gateway
(``server/fleet_gateway.py``) on ``--host:--port``: the address the institutions dial passes nothing but the Fleet
API, so the SuperLink's unauthenticated Control API (register nodes, list / stop / start runs) stays with the
operator's ``flwr`` CLI on loopback (``STATE/flwr-home``). The SuperLink's loopback TLS uses a CA made for it under
``STATE/loopback-tls``; the gateway presents the federation's ``server.pem``. Then it registers the institutions'
SuperNode public keys (over that loopback Control API, from this process: ``common/flower_control.py``), prints
the hash of the app bundle (FAB) it submits (institutions pin it with ``finlora client --app-hash``), submits
the finlora app with the run config and streams Flower's log (the same API, as ``flwr run --stream`` would), and
stops the gateway and the SuperLink at the end.
Everything lives under the state directory; restarted with the same state directory, the run resumes from its
last completed round. Exit code 0 only when Flower reports the run completed (``flwr run`` itself exits 0 on a
failed run).

Restarting after a crash (``kill -9``, a lost machine) is safe: a SuperLink left running on the state directory
is stopped first, keys already registered in the persisted SuperLink database are recognised (Flower answers
"Public key already in use"), an institution whose key left ``--nodes`` is unregistered, and runs the dead
server left unfinished are stopped (which also drops their undelivered messages, so institutions do not train
for a run nobody listens to) before the public port opens and the resumed run is submitted.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finlora.common.certs import init_ca_and_server
from finlora.common.config import ConfigError, PROJECT_ROOT, flatten_table, load_config
from finlora.common.data import default_data_dir
from finlora.common.flower_control import ControlError, SuperLinkControl, run_to_end
from finlora.common.flower_processes import (app_fab_hash, flower_bin, flower_env, free_port, stage_app,
                                             stop_leftover_process, stop_process_tree, toml_value, wait_gateway_ready,
                                             wait_superlink_healthy)
from finlora.common.io import atomic_write_text, read_jsonl_records
from finlora.common.preflight import check_data, check_port_free
from finlora.common.report import print_run_report

CONNECTION = "finlora-server"
REGISTRY_FILE = "institutions.json"
"""Under the state directory: institution name -> SuperNode id and key digest, as registered with the SuperLink."""
PID_FILE = "superlink.pid"
"""Under the state directory: the running SuperLink's process id (found and stopped after a crash)."""
GATEWAY_PID_FILE = "fleet-gateway.pid"
"""Under the state directory: the running Fleet gateway's process id (found and stopped after a crash)."""
GATEWAY_LOG = "fleet-gateway.log"
"""Under the state directory: the gateway's log (one line per refused request: method, path, peer)."""
LOOPBACK_TLS = "loopback-tls"
"""Under the state directory (0700): a CA and certificate for 127.0.0.1 made at every start, for the SuperLink's TLS
(its Control and Runtime APIs, which only the operator's ``flwr`` CLI and Flower's own ServerApp reach)."""
ALREADY_REGISTERED = "Public key already in use"
NONCE_FILE = "zk-run-nonce"
"""Under the state directory: the deployment's random nonce, part of the run id every zk signature is over."""


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
    heldout_data: str | None = None
    """The server's held-out loss set: ``sample``, a JSONL file, or ``none`` (default: config ``data.source``)."""
    eval_data: Path | None = None
    """Directory of FinLoRA test files for the benchmark eval (default: config ``eval.data-dir``, else the
    FinLoRA data directory's ``test/``)."""


def server_data_overrides(opts: ServerOptions, overrides: dict[str, Any]) -> dict[str, Any]:
    """The server's own data, as absolute paths: the ServerApp runs from Flower's copy of the app under
    ``STATE/flwr-home``, where a relative path (or ``../shared/data``) means nothing."""
    out = dict(overrides)
    if opts.heldout_data == "none":
        out["eval.heldout"] = False
    elif opts.heldout_data:
        out["data.source"] = (opts.heldout_data if opts.heldout_data == "sample"
                              else str(Path(opts.heldout_data).expanduser().resolve()))
    source = out.get("data.source")
    if isinstance(source, str) and (source.endswith(".jsonl") or Path(source).expanduser().exists()):
        out["data.source"] = str(Path(source).expanduser().resolve())
    if opts.eval_data is not None:
        out["eval.data-dir"] = str(opts.eval_data.expanduser().resolve())
    elif out.get("eval.data-dir"):
        out["eval.data-dir"] = str(Path(str(out["eval.data-dir"])).expanduser().resolve())
    elif (default_data_dir() / "test").is_dir():
        out["eval.data-dir"] = str((default_data_dir() / "test").resolve())
    if out.get("data.dir"):
        out["data.dir"] = str(Path(str(out["data.dir"])).expanduser().resolve())
    return out


def describe_server_data(cfg: Any) -> str:
    """One line saying what the server scores each global adapter on."""
    heldout = (f"held-out loss on {cfg.data.heldout_size} rows of {cfg.data.source}" if cfg.eval.heldout
               else "no held-out loss")
    if cfg.eval.every or cfg.eval.final:
        when = f"every {cfg.eval.every} rounds" if cfg.eval.every else "after the last round"
        bench = (f"benchmark eval ({cfg.eval.tasks}, {cfg.eval.max_samples or 'all'} rows per task) {when} from "
                 f"{cfg.eval.data_dir or 'the hub'}")
    else:
        bench = "no benchmark eval (eval.every = 0, eval.final = false)"
    return f"{heldout}; {bench}"


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
    gateway_left_running = (state / GATEWAY_PID_FILE).exists()  # a crashed server's gateway may hold the port
    if not gateway_left_running:
        check_port_free(opts.host, opts.port)
    state.mkdir(parents=True, exist_ok=True)
    overrides = read_run_config(opts.config_file)
    run_dir = state / "runs" / opts.run_id
    resume = (run_dir / "metrics.jsonl").exists()
    overrides.update({"out-dir": str(state / "runs"), "run-id": opts.run_id, "resume": resume})
    if overrides.get("zk.enabled", load_config().zk.enabled) and not overrides.get("zk.keys-dir"):
        if opts.nodes is None:
            raise ConfigError("zk is on: --nodes DIR must hold the institutions' <name>.pub.pem signing keys")
        overrides["zk.keys-dir"] = str(opts.nodes.resolve())
    if not overrides.get("zk.run-nonce"):
        overrides["zk.run-nonce"] = deployment_nonce(state)
    overrides = server_data_overrides(opts, overrides)
    cfg = load_config(overrides).check_combinations()
    if cfg.eval.heldout:
        check_data(cfg.data, "--heldout-data" if opts.heldout_data else "data.source")
    if (cfg.eval.every or cfg.eval.final) and cfg.eval.data_dir and not Path(cfg.eval.data_dir).is_dir():
        raise ConfigError(f"{'--eval-data' if opts.eval_data else 'eval.data-dir'} {cfg.eval.data_dir}: no such "
                          f"directory")
    print(f"finlora server: {describe_server_data(cfg)}", flush=True)
    internal_port = free_port()  # the SuperLink's, on 127.0.0.1 only
    env = flower_env(state / "flwr-home", internal_port)
    fed_ca = None if opts.insecure else (opts.certs / "ca.crt").resolve()
    cmd = [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(internal_port),
           "--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation",
           "--log-file", str(state / "superlink.log")]
    gateway_log = state / GATEWAY_LOG
    gateway_cmd = [sys.executable, "-m", "finlora.server.fleet_gateway", "--listen", f"{opts.host}:{opts.port}",
                   "--upstream", f"127.0.0.1:{internal_port}", "--log-file", str(gateway_log)]
    loopback_ca = None
    if opts.insecure:
        cmd.append("--insecure")
        gateway_cmd.append("--insecure")
    else:
        for name in ("ca.crt", "server.pem", "server.key"):
            if not (opts.certs / name).is_file():
                raise ConfigError(f"{opts.certs / name} not found: make it with "
                                  f"'finlora certs init --out {opts.certs}'")
        loopback = _loopback_certificates(state / LOOPBACK_TLS)
        loopback_ca = loopback.ca_cert
        cmd += ["--ssl-ca-certfile", str(loopback.ca_cert), "--ssl-certfile", str(loopback.server_cert),
                "--ssl-keyfile", str(loopback.server_key), "--enable-supernode-auth"]
        gateway_cmd += ["--certfile", str((opts.certs / "server.pem").resolve()),
                        "--keyfile", str((opts.certs / "server.key").resolve()), "--upstream-ca", str(loopback.ca_cert)]
    connection = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                  f'address = "127.0.0.1:{internal_port}"\n')
    connection += "insecure = true\n" if opts.insecure else f'root-certificates = "{loopback_ca}"\n'
    (state / "flwr-home").mkdir(parents=True, exist_ok=True)
    (state / "flwr-home" / "config.toml").write_text(connection)
    print(f"finlora server: Fleet gateway on {opts.host}:{opts.port} "
          f"({'INSECURE' if opts.insecure else 'TLS + node auth'}; log {gateway_log}), SuperLink on "
          f"127.0.0.1:{internal_port}, run {opts.run_id}{' (resuming)' if resume else ''}, {cfg.num_rounds} rounds, "
          f"strategy {cfg.strategy.name}, "
          f"{'secure aggregation (updates only masked)' if cfg.zk.secagg else 'updates NOT masked (zk.secagg off)'}, "
          f"state {state}", flush=True)
    pid_file, gateway_pid_file = state / PID_FILE, state / GATEWAY_PID_FILE
    if stop_leftover_process(gateway_pid_file, must_contain=("finlora.server.fleet_gateway", str(gateway_log))):
        print(f"finlora server: stopped a Fleet gateway left running on {state} by an earlier server process",
              flush=True)
    if stop_leftover_process(pid_file, must_contain=("flower-superlink", str(state / "superlink.db"))):
        print(f"finlora server: stopped a SuperLink left running on {state} by an earlier server process",
              flush=True)
    if gateway_left_running:
        check_port_free(opts.host, opts.port)  # now that our own leftover is stopped
    superlink = subprocess.Popen(cmd, cwd=state, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
    atomic_write_text(pid_file, f"{superlink.pid}\n")
    gateway: subprocess.Popen | None = None
    staged: Path | None = None
    try:
        wait_superlink_healthy(internal_port, superlink, state / "superlink.log", ca_cert=loopback_ca)
        with SuperLinkControl(f"127.0.0.1:{internal_port}", loopback_ca) as control:
            registered = 0 if opts.insecure else len(_register_nodes(opts.nodes, control, state))
            if not opts.insecure and registered < cfg.strategy.min_available_nodes:
                raise ConfigError(f"strategy.min-available-nodes is {cfg.strategy.min_available_nodes} but only "
                                  f"{registered} institution keys are in {opts.nodes}: the run could never start")
            # Before the public port opens: a SuperNode that reconnects while the dead server's run is stopped under
            # it, between pulling one of its messages and confirming it, keeps that message stored (Flower 1.42,
            # start_client_internal on RunNotRunningException) and was seen to send no reply of the resumed run.
            _stop_unfinished_runs(control)
        if not opts.insecure and cfg.zk.enabled and not overrides.get("zk.registry"):
            overrides["zk.registry"] = str(state / REGISTRY_FILE)  # institution -> SuperNode id, fixed before the run
        with open(gateway_log, "ab") as gateway_out:  # crash tracebacks land beside its log lines
            gateway = subprocess.Popen(gateway_cmd, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                                       stdout=gateway_out, stderr=gateway_out, start_new_session=True)
        atomic_write_text(gateway_pid_file, f"{gateway.pid}\n")
        wait_gateway_ready(opts.host, opts.port, gateway, gateway_log, ca_cert=fed_ca)
        app_dir = (opts.app or PROJECT_ROOT).resolve()
        staged = stage_app(app_dir, Path(tempfile.mkdtemp(prefix="finlora-app-")))  # the FAB builder walks all
        fab_hash = app_fab_hash(staged)  # what start_run below submits (Flower's FAB builds are deterministic)
        print(f"finlora server: app hash {fab_hash} (the FAB of {app_dir}; publish it to the institutions, which "
              f"run only the app they pin: 'finlora client --app-hash {fab_hash}' or the default 'auto')", flush=True)
        print(f"finlora server: ready, {registered} institution keys registered; waiting for institutions",
              flush=True)
        overrides_text = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
        run_id, status, problem = run_to_end(f"127.0.0.1:{internal_port}", loopback_ca, staged, overrides_text)
        if problem:
            print(f"finlora server: the Flower run could not be started or followed: {problem}", file=sys.stderr,
                  flush=True)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        if gateway is not None:
            stop_process_tree(gateway)
            gateway_pid_file.unlink(missing_ok=True)
        stop_process_tree(superlink)
        pid_file.unlink(missing_ok=True)
    ok = status.endswith("completed") and not problem
    report_run(run_dir, state / REGISTRY_FILE)
    print(f"finlora server: scored on: {describe_server_data(cfg)}", flush=True)
    print(f"finlora server: Flower run {run_id or '?'} {status}; outputs in {run_dir}", flush=True)
    return 0 if ok else 1


def report_run(run_dir: Path, registry: Path) -> None:
    """What ``finlora simulate`` prints at the end (summary table, privacy table, plots), and one line per
    institution that refused or failed in the last round, by name (``institutions.json``) rather than node id."""
    print_run_report(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        return
    names = {}
    if registry.is_file():
        names = {str(v.get("node_id")): name for name, v in json.loads(registry.read_text()).items()}
    last = read_jsonl_records(run_dir / "metrics.jsonl")[-1]
    for node, reason in sorted({**last.get("errors", {}), **last.get("rejected", {})}.items()):
        who = f"institution {names[node]}" if node in names else f"node {node}"
        what = "refused" if node in last.get("refused", []) else "was left out"
        print(f"finlora server: round {last['round']}: {who} {what}: {reason[:300]}", flush=True)


def deployment_nonce(state: Path) -> str:
    """This deployment's random run nonce (``zk.run-nonce``): made at the first start, kept in ``STATE/`` so that a
    restarted server resumes under the same signed run id; a new state directory is a new deployment."""
    import secrets

    path = state / NONCE_FILE
    if path.is_file():
        nonce = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{32}", nonce):
            return nonce
        raise ConfigError(f"{path}: expected the 32-hex-digit run nonce this deployment started with, got "
                          f"{nonce[:80]!r} (delete the file only to start a new deployment)")
    nonce = secrets.token_hex(16)
    atomic_write_text(path, nonce + "\n")
    return nonce


def _loopback_certificates(directory: Path) -> Any:
    """A fresh CA and certificate for 127.0.0.1 / localhost in a 0700 directory (made at every start)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    files = init_ca_and_server(directory, ["127.0.0.1", "localhost"])
    return type(files)(*(p.resolve() for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key)))


def _register_nodes(nodes: Path | None, control: SuperLinkControl, state: Path) -> dict[str, int | None]:
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
        node_id: int | None
        try:
            node_id, how = control.register_node(key.resolve()), "registered"
        except ControlError as exc:
            if ALREADY_REGISTERED not in str(exc):
                raise ConfigError(f"registering {key} failed: {_gist(str(exc))}") from exc
            known = next((v for v in previous.values() if v.get("key_sha256") == digest), None)
            node_id, how = (known or {}).get("node_id"), "already registered"
        current[name] = {"node_id": node_id, "key_sha256": digest}
        shown = node_id if node_id is not None else "(id not recorded)"
        print(f"finlora server: institution {name} {how} as SuperNode {shown}", flush=True)
    kept_ids = {v["node_id"] for v in current.values()}
    for name, old in previous.items():
        if old.get("node_id") is not None and old["node_id"] not in kept_ids:
            try:
                control.unregister_node(int(old["node_id"]))
            except ControlError as exc:
                raise ConfigError(f"unregistering SuperNode {old['node_id']} (institution {name}, whose key is no "
                                  f"longer in {nodes}) failed: {_gist(str(exc))}") from exc
            print(f"finlora server: institution {name}: its old key is no longer in {nodes}; SuperNode "
                  f"{old['node_id']} unregistered", flush=True)
    atomic_write_text(registry_path, json.dumps(current, indent=2, sort_keys=True) + "\n")
    return {name: v["node_id"] for name, v in current.items()}


def _stop_unfinished_runs(control: SuperLinkControl) -> None:
    """Stop runs a crashed server left unfinished in the persisted database (Flower then drops their messages)."""
    for run in control.list_runs():
        if run.status and not run.status.startswith("finished"):
            try:
                control.stop_run(int(run.run_id))
                outcome = "stopped"
            except ControlError as exc:
                outcome = f"could not be stopped ({_gist(str(exc))})"
            print(f"finlora server: Flower run {run.run_id} ({run.status}), left unfinished by an earlier server "
                  f"process, {outcome}", flush=True)


def _gist(text: str, limit: int = 400) -> str:
    """Flower's CLI answer without its box drawing."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())[-limit:]
