"""``finlora client``: an institution joins a federation with its private data, on Flower's SuperNode.

Everything that can be checked locally is checked **before** connecting, each failure naming the file and what is
wrong: the data file (every line), the SuperNode-auth key, the CA certificate and the zk signing key. Then
``flower-supernode`` runs in the foreground with the node config (``data-path``, ``institution``, ``zk-key``)
until the SuperLink ends the federation or the process is interrupted; its descendants are stopped with it.

**App pinning**: the SuperNode runs only the app bundle (FAB) whose SHA-256 the institution pinned with
``--app-hash`` (``auto``, the default: the FAB Flower builds from this finlora installation, which is what an
operator running the same finlora submits; a hex digest the operator published; ``any``: unpinned, with a
warning). ``flower-superexec`` finds ``flwr-clientapp`` on PATH, so the SuperNode's PATH starts with a private 0700
folder (``STATE/pinned-bin``) whose ``flwr-clientapp`` runs ``client/pinned_clientapp.py``: it refuses a FAB of
another hash before installing or importing anything of it, and the server receives an error reply for the node.

The institution's own privacy policy travels in the node config (``dp-required``, ``dp-epsilon``, ``dp-delta``,
``dp-max-grad-norm``, ``dp-state-dir``, ``secagg-required``); the ClientApp enforces it.

Unless ``--no-resident``, a resident trainer (``client/resident/``) is started first and named in the node config
(``trainer-socket``): it keeps the base model and the tokenized data loaded across messages, which Flower's
one-process-per-message ClientApp cannot. It is restarted if it dies while the SuperNode runs, and stopped with it.

If the SuperNode dies (killed, crashed), ``finlora client`` deactivates it at the SuperLink in its place
(``client/node_down.py``), as a SuperNode that stops normally does itself, once its last reply has had time to be
read (``REPLY_READ_GRACE_S``), so that the server's round does not wait a minute of missed heartbeats for a reply
that cannot come; then it exits with the SuperNode's code.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from finlora.client.node_down import deactivate_node, node_id_in
from finlora.client.node_settings import PROGRESS_KEY
from finlora.client.progress import read_progress
from finlora.client.resident import ResidentTrainer, TrainerStartError
from finlora.common.certs import check_ca_certificate, check_node_auth_key
from finlora.common.config import PROJECT_ROOT, ConfigError
from finlora.common.data import read_jsonl
from finlora.common.io import cache_root
from finlora.common.flower_processes import (app_fab_hash, die_with_parent, flower_bin, flower_env, free_port,
                                             stop_process_tree, toml_value)


REFUSED_MARK = "[code: 2004]"
"""What ``flower-supernode`` prints when the SuperLink does not accept the node (an unregistered key)."""
TLS_FAILED_MARKS = ("SSL/TLS handshake error detected", "CERTIFICATE_VERIFY_FAILED")
"""What ``flower-supernode`` prints when the server's certificate does not verify against ``--root-certificates``
(Flower 1.42: ``ERROR: SSL/TLS handshake error detected.``, then ``[SSL: CERTIFICATE_VERIFY_FAILED] certificate
verify failed: ...``, then it exits with code 1)."""
SENT_MARK = "Sent successfully"
"""What ``flower-supernode`` logs once a reply has reached the SuperLink (Flower 1.42, ``_push_messages``)."""
LOST_MARK = "Connection attempt failed"
"""What it logs when the SuperLink does not answer (Flower 1.42, ``flwr/supercore/retry/http_retry.py``)."""
REPLY_READ_GRACE_S = 15.0
"""How long after its SuperNode's last reply ``finlora client`` waits before deactivating the dead SuperNode: the
ServerApp pulls replies every 3 s (Flower 1.42, ``http_grid``), and the SuperLink answers for an offline node with
an error even when the node's reply is there unread (``check_node_availability_for_in_message`` runs first), so a
reply sent just before the SuperNode died would otherwise be lost."""
PROGRESS_FILE = "progress.json"
"""Under the client's state directory: the ClientApp's last finished task (``client/progress.py``)."""
PIN_ENV = "FINLORA_PINNED_APP_HASH"
"""The pinned FAB hash, read by ``client/pinned_clientapp.py`` in every ``flwr-clientapp`` process."""
PINNED_BIN = "pinned-bin"
"""Under the client's state directory (0700): the ``flwr-clientapp`` that checks the app's hash first."""


@dataclass(frozen=True)
class ClientOptions:
    """What ``finlora client`` was asked to do."""

    superlink: str
    ca: Path | None
    key: Path | None
    data: Path
    name: str
    sign_key: Path | None
    state: Path
    insecure: bool
    gpu: int | None
    dp_epsilon: float | None
    max_wait_time: float | None = None
    resident: bool = True
    app_hash: str = "auto"
    """``auto`` (this installation's FAB), a SHA-256 hex digest, or ``any`` (unpinned)."""
    zk_peers: Path | None = None
    """The institutions' public keys (secure aggregation checks peers against them); default: the signing key's
    directory."""
    dp_delta: float | None = None
    dp_max_grad_norm: float | None = None
    dp_ledger_dir: Path | None = None
    allow_no_dp: bool = False
    allow_unmasked: bool = False
    """Accept runs that send this institution's update without secure aggregation (default: refuse them)."""
    exit_after_idle: float | None = None
    """Exit (0) after this many seconds without a task once at least one was done (default: only when the run
    is finished, or the SuperLink gone for ``max_wait_time``)."""


def resolve_app_pin(app_hash: str) -> str | None:
    """The SHA-256 the institution pins (None for ``any``); ``auto`` builds this installation's FAB."""
    value = app_hash.strip().lower()
    if value == "any":
        return None
    if value == "auto":
        return app_fab_hash(PROJECT_ROOT)
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ConfigError(f"--app-hash {app_hash!r}: expected 'auto', 'any' or the 64-hex-digit SHA-256 of the app "
                          f"(FAB) the server prints as 'app hash ...'")
    return value


def write_pinned_clientapp(state: Path) -> Path:
    """``STATE/pinned-bin/flwr-clientapp`` (0700 folder), running ``client/pinned_clientapp.py`` with this Python."""
    folder = state / PINNED_BIN
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    script = Path(__file__).resolve().parent / "pinned_clientapp.py"
    shim = folder / "flwr-clientapp"
    tmp = folder / ".flwr-clientapp.tmp"
    tmp.write_text("#!/bin/sh\n# finlora app pinning: flower-superexec starts this instead of Flower's flwr-clientapp\n"
                   f"exec {shlex.quote(sys.executable)} {shlex.quote(str(script))} \"$@\"\n")
    tmp.chmod(0o700)
    tmp.replace(shim)
    return folder


def preflight(opts: ClientOptions) -> dict[str, object]:
    """Check data, keys and certificate; the node config to start with (raises with the culprit named)."""
    rows = read_jsonl(opts.data)  # DataError names file:line
    if not opts.insecure:
        if opts.ca is None or opts.key is None:
            raise ConfigError("--ca and --key are required unless --insecure")
        check_ca_certificate(opts.ca)
        check_node_auth_key(opts.key)
    node_config: dict[str, object] = {"data-path": str(opts.data.resolve()), "institution": opts.name}
    sign_key = opts.sign_key or (opts.key.parent / f"{opts.name}.key" if opts.key else None)
    if sign_key is not None:
        if not sign_key.is_file():
            raise ConfigError(f"{sign_key}: zk signing key of '{opts.name}' not found ('finlora certs node' makes it)")
        node_config["zk-key"] = str(sign_key.resolve())
        peers = opts.zk_peers or sign_key.parent
        if opts.zk_peers is not None and not opts.zk_peers.is_dir():
            raise ConfigError(f"--zk-peers {opts.zk_peers}: not a directory of the institutions' public keys")
        node_config["zk-peers"] = str(peers.resolve())
    # the institution's own privacy policy (enforced by the ClientApp)
    node_config["dp-required"] = not opts.allow_no_dp
    node_config["secagg-required"] = not opts.allow_unmasked
    for key, value in (("dp-epsilon", opts.dp_epsilon), ("dp-delta", opts.dp_delta),
                       ("dp-max-grad-norm", opts.dp_max_grad_norm)):
        if value is not None:
            node_config[key] = float(value)
    if opts.dp_ledger_dir is not None:
        node_config["dp-state-dir"] = str(opts.dp_ledger_dir.resolve())
    print(f"finlora client {opts.name}: {len(rows)} rows in {opts.data}; connecting to {opts.superlink}", flush=True)
    return node_config


def run_client(opts: ClientOptions) -> int:
    node_config = preflight(opts)
    pin = resolve_app_pin(opts.app_hash)
    state = opts.state.resolve()
    env = flower_env(state / "flwr-home", free_port())
    if opts.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(opts.gpu)
    state.mkdir(parents=True, exist_ok=True)
    if pin is None:
        env.pop(PIN_ENV, None)
        print(f"finlora client {opts.name}: WARNING: --app-hash any: this institution runs ANY app the server sends, "
              f"with access to its data and keys", flush=True)
    else:
        env["PATH"] = os.pathsep.join([str(write_pinned_clientapp(state)), env["PATH"]])
        env[PIN_ENV] = pin
        print(f"finlora client {opts.name}: runs only the app with hash {pin}"
              f"{' (auto: this finlora installation)' if opts.app_hash.strip().lower() == 'auto' else ''}", flush=True)
    trainer: ResidentTrainer | None = None
    proc: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    refused = threading.Event()
    tls_failure: list[str] = []
    trainer_failed = False
    progress_path = state / PROGRESS_FILE
    progress_path.unlink(missing_ok=True)  # a finished earlier run must not end this one
    node_config[PROGRESS_KEY] = str(progress_path)
    sent_at: list[float] = []
    lost_at: list[float] = []
    node_ids: list[int] = []
    finished = ""
    try:
        if opts.resident:
            # One long-lived process keeps the base model loaded; Flower's per-message ClientApp hands it the task.
            trainer = ResidentTrainer(state, env, opts.name)
            trainer.start()
            node_config.update(trainer.node_config)
            print(f"finlora client {opts.name}: resident trainer pid {trainer.pid} on {trainer.socket_path}",
                  flush=True)
        cmd = [flower_bin("flower-supernode"), "--superlink", opts.superlink, "--port", str(free_port()),
               "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())]
        if opts.max_wait_time is not None:  # stop waiting for a SuperLink that has gone away
            cmd += ["--max-wait-time", str(opts.max_wait_time)]
        if opts.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(opts.ca.resolve()),  # type: ignore[union-attr]
                    "--auth-supernode-private-key", str(opts.key.resolve())]  # type: ignore[union-attr]
        proc = subprocess.Popen(cmd, cwd=state, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=die_with_parent)
        supernode = proc

        def relay() -> None:
            """Copy the SuperNode's output; on a refusal stop it (it would otherwise retry, or linger, for ever)."""
            for line in supernode.stdout:  # type: ignore[union-attr]
                sys.stdout.write(line)
                if REFUSED_MARK in line and not refused.is_set():
                    refused.set()
                    supernode.terminate()
                if any(mark in line for mark in TLS_FAILED_MARKS):
                    tls_failure.append(line.strip())
                if SENT_MARK in line:
                    sent_at.append(time.time())
                if LOST_MARK in line:
                    lost_at.append(time.time())
                if (node_id := node_id_in(line)) is not None:
                    node_ids.append(node_id)

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        while True:
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            finished = _finished(read_progress(progress_path), sent_at, lost_at, opts.exit_after_idle)
            if finished:
                stop_process_tree(proc)
                code = 0
                break
        if code not in (0, 130) and node_ids and not refused.is_set() and not opts.insecure:
            _say_goodbye_for(opts, node_ids[-1], sent_at[-1] if sent_at else None)  # before cleaning up
    except KeyboardInterrupt:
        code = 130
    except TrainerStartError as exc:
        print(f"finlora client {opts.name}: {exc}", file=sys.stderr, flush=True)
        code, trainer_failed = 4, True
    finally:
        if proc is not None:
            stop_process_tree(proc)  # also its superexec child, which holds the output pipe open
        if reader is not None:
            reader.join(timeout=10)
        if trainer is not None:
            trainer.stop()
    if trainer_failed:
        return code
    if tls_failure:
        reason = next((x for x in tls_failure if "CERTIFICATE_VERIFY_FAILED" in x), tls_failure[-1])
        print(f"finlora client {opts.name}: TLS handshake with {opts.superlink} failed: the server's certificate "
              f"does not verify against the CA {opts.ca} (wrong CA file, or not this federation's server): {reason}",
              file=sys.stderr, flush=True)
        return 3
    if refused.is_set():
        print(f"finlora client {opts.name}: the SuperLink refused this node (Flower code 2004): its public key "
              f"{opts.key.with_suffix('.pub') if opts.key else ''} is not registered with the server, or the server "
              f"is not the one the CA {opts.ca} certifies", file=sys.stderr, flush=True)
        return 3
    if finished:
        print(f"finlora client {opts.name}: {finished}; SuperNode stopped, exiting", flush=True)
        return 0
    if code not in (0, 130):
        print(f"finlora client {opts.name}: flower-supernode exited with code {code}", file=sys.stderr, flush=True)
    return code


def _say_goodbye_for(opts: ClientOptions, node_id: int, last_reply_at: float | None) -> None:
    """Deactivate the dead SuperNode at the SuperLink (``client/node_down.py``), so that the server's round stops
    waiting for it within seconds rather than after a minute of missed heartbeats; not before its last reply is
    ``REPLY_READ_GRACE_S`` old, so that the server has read it."""
    if last_reply_at is not None:
        time.sleep(max(0.0, last_reply_at + REPLY_READ_GRACE_S - time.time()))
    try:
        deactivate_node(opts.superlink, opts.ca, opts.key, node_id)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - any failure leaves the heartbeats to tell the SuperLink
        print(f"finlora client {opts.name}: could not tell the SuperLink that SuperNode {node_id} is gone ({exc}); "
              f"it will notice the missed heartbeats", file=sys.stderr, flush=True)
    else:
        print(f"finlora client {opts.name}: told the SuperLink that SuperNode {node_id} is gone (deactivated)",
              file=sys.stderr, flush=True)


def _finished(progress: dict | None, sent_at: list[float], lost_at: list[float], exit_after_idle: float | None) -> str:
    """Why this institution is done (empty: it is not): the run's last message for it was answered, the reply
    sent, and then the SuperLink went away (``finlora server`` stops it when the run ends; leaving as soon as the
    reply is sent would let the SuperLink replace the reply by "node unavailable" before the server reads it);
    or no task came for ``exit_after_idle`` seconds after the last reply."""
    if progress is None:
        return ""
    replied = bool(sent_at) and sent_at[-1] >= float(progress.get("at", 0))
    if progress.get("final") and replied and lost_at and lost_at[-1] >= sent_at[-1]:
        return (f"run {progress.get('run_id')} finished (round {progress.get('round')} of "
                f"{progress.get('num_rounds')} answered)")
    if exit_after_idle is not None and replied and time.time() - sent_at[-1] > exit_after_idle:
        return f"no task for {exit_after_idle:g} s after round {progress.get('round')} (--exit-after-idle)"
    return ""


def default_state_dir(name: str) -> Path:
    """Where an institution's SuperNode keeps its Flower home (and, by default, its privacy ledger's siblings)."""
    return cache_root() / "nodes" / name
