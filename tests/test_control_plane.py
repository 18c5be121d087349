"""The federation's port passes the Fleet protocol only: an outsider holding the public ``ca.crt`` cannot register a
SuperNode key, list or stop runs, or reach any other API of the SuperLink, which listens on 127.0.0.1 only; and a
run whose institutions do not all come fails after the round timeout instead of waiting for ever.

Real ``finlora server`` (SuperLink with TLS + node auth, Fleet gateway on 0.0.0.0), attacked with Flower's own CLI
and raw HTTPS; the operator's loopback connection then shows that nothing changed."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from pathlib import Path

import httpx
import psutil

from finlora.common.flower_processes import flower_bin
from tests.test_deployment import FAST_RUN, Processes, _cmdline, _node_ids, federation, processes  # noqa: F401

REFUSED_PATHS = ["v1/control/list-runs", "v1/control/register-node", "v1/control/stop-run",
                 "v1/control/start-run", "v1/control/list-nodes", "v1/runtime/pull-task-input",
                 "v1/runtime/create-task", "docs", "openapi.json", "health", "v1/fleet", "v1/fleet/",
                 "v1/fleet/get-run/../../control/list-runs", "v1/fleet/%2e%2e/control/list-runs",
                 "/" + "v1/control/list-runs", "V1/CONTROL/LIST-RUNS"]
"""URL paths below the server's root (each is requested as '/' + path; the leading '/' of one makes '//...')."""
FLEET_PROBE = "v1/fleet/get-run"
"""A Fleet API endpoint (POST only), reached through the gateway."""


def _flwr(flwr_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return subprocess.run([flower_bin("flwr"), *args], cwd=flwr_home, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_the_public_port_passes_only_the_fleet_api_and_too_few_institutions_fail_the_run(federation, tmp_path,
                                                                                        processes: Processes):
    """The control plane is attacked while the server waits for its institutions; only bank-0 of the two it needs
    comes. Then the run ends as an under-attended one must: Flower's node sampling waits for
    ``strategy.min-available-nodes`` without a deadline; finlora bounds the wait by ``strategy.round-timeout`` and
    fails the run naming the setting. (One server for both: each start costs a SuperLink, a gateway and a
    ServerApp.)"""
    # 24 s: the attacks below take about 10 s (and the ServerApp only starts waiting some seconds after "ready")
    server = processes.server(f'num-rounds = 1\n"strategy.round-timeout" = 24.0\n{FAST_RUN}', host="0.0.0.0")
    processes.client("bank-0", "--no-resident")  # 1 of the 2 institutions needed (it never trains: no trainer)
    ca, port = federation / "certs" / "ca.crt", processes.port
    outsider_home = tmp_path / "outsider-flwr"
    outsider_home.mkdir()
    (outsider_home / "config.toml").write_text(
        f'[superlink]\ndefault = "public"\n\n[superlink.public]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n')

    # Flower's CLI, pointed at the federation's address, with the federation's CA
    register = _flwr(outsider_home, "supernode", "register", str(federation / "outsider" / "intruder.auth.pub"),
                     "public")
    assert register.returncode != 0 and "404" in register.stdout + register.stderr, register.stdout + register.stderr
    listed = _flwr(outsider_home, "ls", "public", "--format", "json")
    assert json.loads(listed.stdout)["success"] is False and "404" in listed.stdout, listed.stdout
    stopped = _flwr(outsider_home, "stop", "1", "public")
    assert stopped.returncode != 0, stopped.stdout

    # raw HTTPS: everything but the Fleet API is 404; the Fleet API answers (and authenticates) as the SuperLink
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ssl.create_default_context(cafile=str(ca)),
                      timeout=30) as http:
        for path in REFUSED_PATHS:
            for method in ("POST", "GET"):
                reply = http.request(method, "/" + path, content=b"",
                                     headers={"content-type": "application/protobuf"})
                assert reply.status_code == 404, (method, path, reply.status_code, reply.text[:200])
        fleet = http.post("/" + FLEET_PROBE, content=b"", headers={"content-type": "application/protobuf"})
        assert fleet.status_code == 401, fleet.text  # the SuperLink's node authentication, reached through the gateway
        assert http.get("/" + FLEET_PROBE).status_code == 404  # Fleet is POST only
    gateway_log = (tmp_path / "state" / "fleet-gateway.log").read_text()
    assert "refused POST /v1/control/register-node from 127.0.0.1:" in gateway_log, gateway_log[-2000:]

    # the operator's loopback connection: only the institutions' keys are registered, no run was touched
    operator_home = tmp_path / "state" / "flwr-home"
    nodes = _flwr(operator_home, "supernode", "list", "finlora-server", "--format", "json")
    listed_ids = {int(n["node-id"]) for n in json.loads(nodes.stdout)["nodes"]}
    assert listed_ids == set(_node_ids(processes.log("server.log")).values()), nodes.stdout
    again = _flwr(operator_home, "supernode", "register", str(federation / "outsider" / "intruder.auth.pub"),
                  "finlora-server")
    assert again.returncode == 0 and "registered" in again.stdout, again.stdout + again.stderr  # it was not in use

    # the SuperLink listens on loopback only; the public port is the gateway's
    server_tree = psutil.Process(processes.started[0].pid).children(recursive=True)
    superlink = [p for p in server_tree if "flower-superlink" in _cmdline(p)]
    gateway = [p for p in server_tree if "server.fleet_gateway" in _cmdline(p)]
    assert len(superlink) == 1 and len(gateway) == 1, [_cmdline(p) for p in server_tree]
    listening = [c.laddr for c in superlink[0].net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" and addr.port != port for addr in listening), listening
    public = [c.laddr for c in gateway[0].net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert [(a.ip, a.port) for a in public] == [("0.0.0.0", port)], public

    # the run: one institution of the two needed, so it fails once the round timeout has passed
    assert processes.wait(server, 200) == 1
    log = processes.log("server.log")
    assert "only 1 of the 2 institutions needed (strategy.min-available-nodes" in log, log[-3000:]
    assert "finished:failed" in log
