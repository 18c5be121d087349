"""``finlora``: the one command line of the project.

Subcommands are small functions over argparse; each reads the one config tree (``pyproject.toml``
``[tool.flwr.app.config]``) and applies its flags as overrides, so a flag is only a short name for a key.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finlora.client.deploy import ClientOptions, default_state_dir, run_client
from finlora.client.dp_setup import ledger_dir, start_new_period
from finlora.client.moe_train import add_moe_parser
from finlora.client.privacy import FileLedgerStore
from finlora.common.certs import CertificateError, init_ca_and_server, init_node
from finlora.common.config import ConfigError, FinloraConfig, load_config, parse_experts, parse_override
from finlora.common.data import DataError, default_data_dir, load_rows, partition_rows
from finlora.common.io import atomic_write_jsonl
from finlora.common.moe import MixtureError, check_experts
from finlora.common.preflight import check_data, check_gpu, check_model, check_positive, check_writable
from finlora.common.report import print_run_report, round_problems
from finlora.eval.cli import add_compare_parser, add_eval_parser
from finlora.server.checkpoint import RunDirectory
from finlora.server.deploy import ServerOptions, run_server
from finlora.server.serving.cli import add_serve_parser
from finlora.simulation.keys import provision_simulation_keys
from finlora.simulation.launcher import PROJECT_ROOT, run_simulation
from finlora.zk.cli import add_zk_parser
from finlora.zk.signing import write_key_pair


def _overrides_from_args(args: argparse.Namespace, saved: dict[str, Any]) -> dict[str, Any]:
    """Map the simulate flags onto config keys (``--set k=v`` last, so it wins); ``saved``: a resumed run's
    config (empty for a new run)."""
    overrides: dict[str, Any] = {"num-rounds": args.rounds}
    given = dict(parse_override(text) for text in args.set or [])
    pairs = {"model.name": args.model, "model.quantization": args.quantization, "data.source": args.data,
             "strategy.name": args.strategy, "lora.ffa": args.ffa or None,
             "data.partitioner": "dirichlet" if args.dirichlet is not None else None,
             "data.dirichlet-alpha": args.dirichlet, "train.local-steps": args.local_steps,
             "dp.enabled": args.dp, "dp.epsilon": args.epsilon, "dp.delta": args.delta,
             "dp.max-grad-norm": args.max_grad_norm, "dp.level": args.dp_level,
             "eval.every": args.eval_every, "eval.tasks": args.eval_tasks, "eval.max-samples": args.eval_max_samples,
             "eval.final": args.final_eval or None, "zk.enabled": args.zk, "zk.secagg": args.secagg}
    overrides.update({k: v for k, v in pairs.items() if v is not None})
    if args.moe:
        experts = parse_experts(",".join(args.moe), "--moe")  # DIRs made absolute: Flower runs the apps elsewhere
        overrides["moe.experts"] = ",".join(f"{name}={Path(path).expanduser().resolve()}"
                                            for name, path in experts.items())
        overrides.setdefault("eval.every", 0)  # the benchmark scores adapters; a mixture is scored by moe compare
    if args.secagg is None and "zk.secagg" not in given and "zk.secagg" not in saved and args.clients < 3:
        # secure aggregation (on by default) hides an update only among 3+ institutions: a researcher's
        # 2-institution simulation runs without it (the banner says so); an explicit --secagg errs
        overrides["zk.secagg"] = False
    # the config's own rule decides whether masking is on (off with zk.enabled = false: nothing committed)
    effective = load_config({**saved, **overrides, **given})
    min_nodes = min(3 if effective.zk.secagg else 2, args.clients)  # secure aggregation hides nothing with two
    overrides.update({"strategy.min-train-nodes": min_nodes, "strategy.min-evaluate-nodes": min_nodes,
                      "strategy.min-available-nodes": args.clients})
    overrides.update(given)
    return overrides


def _absolute_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    """Resolve data locations here, against the user's directory and this checkout.

    Flower runs the apps from an extracted copy of the project under its own home, where relative paths
    and ``../shared/data`` beside the project mean nothing.
    """
    out = dict(overrides)
    source = out.get("data.source")
    if isinstance(source, str) and (source.endswith(".jsonl") or Path(source).expanduser().exists()):
        out["data.source"] = str(Path(source).expanduser().resolve())
    for key, default in (("data.dir", default_data_dir()), ("eval.data-dir", default_data_dir() / "test")):
        if out.get(key):
            out[key] = str(Path(out[key]).expanduser().resolve())
        elif default.is_dir():
            out[key] = str(default.resolve())
    return out


def _run_location(args: argparse.Namespace) -> tuple[Path, str]:
    """(out dir, run id): ``--resume RUN_DIR`` names both; otherwise ``--out`` and ``--run-id`` or a new id."""
    if args.resume:
        run_dir = Path(args.resume).expanduser().resolve()
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {args.resume}: no such run directory")
        return run_dir.parent, run_dir.name
    run_id = args.run_id or time.strftime("sim-%Y%m%d-%H%M%S")
    return Path(args.out).expanduser().resolve(), run_id


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run a local multi-process simulation (Flower + Ray), then print and plot its summary."""
    check_positive("--clients", args.clients, "simulated institutions")
    check_positive("--rounds", args.rounds, "federated rounds in total")
    if args.secagg and args.clients < 3:
        raise ConfigError(f"--secagg needs --clients 3 or more (got {args.clients}): with two institutions each "
                          f"could subtract its own update from the sum")
    out_dir, run_id = _run_location(args)
    saved = RunDirectory(out_dir / run_id).saved_config() if args.resume else {}
    saved = {k: v for k, v in saved.items() if k not in ("num-rounds", "resume")}
    # continue a resumed run as it was started; flags given now still win
    overrides = {**saved, **_overrides_from_args(args, saved)}
    overrides = _absolute_paths(overrides)  # after the saved config: a default never replaces a saved location
    overrides.update({"out-dir": str(out_dir), "run-id": run_id, "resume": bool(args.resume)})
    cfg = load_config(overrides).check_combinations()  # fail here, with the key's name, not inside a Ray actor
    if args.secagg and not cfg.zk.secagg:
        raise ConfigError("--secagg needs zk (secure aggregation masks the committed updates): drop --no-zk")
    check_model(cfg.model.name, "--model" if args.model else "model.name")
    check_data(cfg.data, "--data" if args.data else "data.source", min_rows=args.clients)
    check_writable(out_dir, "--out")
    if cfg.moe.experts:
        try:
            check_experts(parse_experts(cfg.moe.experts, "moe.experts"))
        except MixtureError as exc:
            raise ConfigError(f"{'--moe' if args.moe else 'moe.experts'}: {exc}") from exc
    run_dir = out_dir / run_id
    if cfg.zk.enabled and not cfg.zk.keys_dir:
        overrides["zk.keys-dir"] = str(provision_simulation_keys(run_dir / "keys", args.clients))
    if cfg.zk.enabled and not cfg.zk.run_nonce:  # a resumed run keeps the saved one (read from its config above)
        overrides["zk.run-nonce"] = secrets.token_hex(16)
    if cfg.moe.experts:
        print(f"finlora simulate: {args.clients} institutions x {cfg.num_rounds} rounds, model {cfg.model.name}, "
              f"data {cfg.data.source} ({cfg.data.partitioner}): federated training of a router over the experts "
              f"{cfg.moe.experts} (FedAvg{privacy_banner(cfg)})\n  output: {run_dir}", flush=True)
    else:
        print(f"finlora simulate: {args.clients} institutions x {cfg.num_rounds} rounds, model {cfg.model.name}, "
              f"data {cfg.data.source} ({cfg.data.partitioner}), strategy {cfg.strategy.name}"
              f"{' + FFA-LoRA' if cfg.lora.ffa else ''}{privacy_banner(cfg)}, "
              f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} "
              f"on {cfg.lora.target_modules}\n  output: {run_dir}", flush=True)
    result = run_simulation(args.clients, overrides, app_dir=Path(args.app) if args.app else PROJECT_ROOT,
                            cpus_per_client=args.cpus_per_client, gpus_per_client=args.gpus_per_client)
    problems = round_problems(run_dir, cfg.num_rounds)
    print_run_report(run_dir)
    if not result.ok or problems:
        print(f"finlora simulate: FAILED (Flower run {result.run_id or '?'} status: {result.status}"
              f"{'; ' + '; '.join(problems) if problems else ''})", file=sys.stderr)
        return 1
    what = "global mixtures (moe.json + router)" if cfg.moe.experts else "global adapters"
    print(f"finlora simulate: {cfg.num_rounds} rounds completed; {what} in {run_dir}/round-<k>/")
    if cfg.zk.enabled:
        keys = Path(str(overrides.get("zk.keys-dir") or cfg.zk.keys_dir))
        print(f"audit it: finlora zk audit {run_dir} --keys {keys}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """``certs init``: CA + server certificate; ``certs node``: an institution's auth and signing keys."""
    out = Path(args.out)
    if args.certs_command == "init":
        files = init_ca_and_server(out, [n.strip() for n in args.server_name.split(",") if n.strip()])
        print(f"CA {files.ca_cert} (give it to every institution), server certificate {files.server_cert}, "
              f"keys {files.ca_key} and {files.server_key} (0600)")
    else:
        files = init_node(out, args.name, write_key_pair)
        print(f"{args.name}: node-auth key {files.auth_key} (0600) and public key {files.auth_pub} (register it with "
              f"the server), zk signing key {files.sign_key} (0600) and public key {files.sign_pub} (register it too)")
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    """One private JSONL per institution, with the simulation's partitioners (to rehearse a deployment)."""
    if bool(args.task) == bool(args.data):
        raise ConfigError("give exactly one of --task TASK or --data PATH")
    check_positive("--clients", args.clients, "one JSONL file per institution")
    cfg = load_config({"data.source": args.task or str(Path(args.data).resolve())}).data
    rows = load_rows(cfg)
    out = Path(args.out)
    partitioner = "dirichlet" if args.dirichlet is not None else "iid"
    names = ([n.strip() for n in (args.names or "").split(",") if n.strip()]
             or [f"bank-{i}" for i in range(args.clients)])
    if len(names) != args.clients or len(set(names)) != len(names):
        raise ConfigError(f"--names {args.names}: expected {args.clients} distinct names (one per --clients)")
    for i, name in enumerate(names):
        part = partition_rows(rows, args.clients, i, partitioner, args.dirichlet or 0.5, args.seed)
        atomic_write_jsonl(out / f"{name}.jsonl", part)
        print(f"{out / f'{name}.jsonl'}: {len(part)} rows")
    return 0


def cmd_dp(args: argparse.Namespace) -> int:
    """``dp ledger``: what an institution's data has spent; ``dp new-period``: start a new budget period."""
    data = Path(args.data).expanduser().resolve()
    directory = ledger_dir(args.ledger_dir)
    store = FileLedgerStore(directory, str(data))
    if args.dp_command == "ledger":
        ledger = store.load()
        if ledger is None:
            print(f"{data}: nothing spent yet (no ledger at {store.path})")
        else:
            print(f"{data}: epsilon {ledger.epsilon():.4f} spent of a budget of {ledger.target_epsilon:g} (delta "
                  f"{ledger.delta:.3g}, {ledger.steps} DP-SGD steps); ledger {store.path}")
        return 0
    archive = start_new_period(data, directory)
    print(f"{data}: no ledger at {store.path}, nothing to close" if archive is None else
          f"{data}: budget period closed, its ledger kept as {archive}; the next run starts at zero spend")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    return run_server(ServerOptions(state=Path(args.state), config_file=Path(args.config) if args.config else None,
                                    certs=Path(args.certs or Path(args.state) / "certs"),
                                    nodes=Path(args.nodes) if args.nodes else None, host=args.host, port=args.port,
                                    insecure=args.insecure, run_id=args.run_id,
                                    app=Path(args.app) if args.app else None, heldout_data=args.heldout_data,
                                    eval_data=Path(args.eval_data) if args.eval_data else None))


def cmd_client(args: argparse.Namespace) -> int:
    check_gpu(args.gpu)
    name = args.name or Path(args.key or args.data).name.split(".")[0]
    return run_client(ClientOptions(superlink=args.superlink, ca=Path(args.ca) if args.ca else None,
                                    key=Path(args.key) if args.key else None, data=Path(args.data), name=name,
                                    sign_key=Path(args.sign_key) if args.sign_key else None,
                                    zk_peers=Path(args.zk_peers) if args.zk_peers else None,
                                    state=Path(args.state) if args.state else default_state_dir(name),
                                    insecure=args.insecure, gpu=args.gpu, dp_epsilon=args.dp_epsilon,
                                    max_wait_time=args.max_wait_time, resident=not args.no_resident,
                                    app_hash=args.app_hash, dp_delta=args.dp_delta,
                                    dp_max_grad_norm=args.dp_max_grad_norm,
                                    dp_ledger_dir=Path(args.dp_ledger_dir) if args.dp_ledger_dir else None,
                                    allow_no_dp=args.allow_no_dp, allow_unmasked=args.allow_unmasked,
                                    exit_after_idle=args.exit_after_idle))


def privacy_banner(cfg: FinloraConfig) -> str:
    """", DP (...), zk commitments + secure aggregation": what protects the institutions' updates in this run."""
    return (f"{f', DP ({cfg.dp.level} level, epsilon {cfg.dp.epsilon:g})' if cfg.dp.enabled else ', no DP'}"
            f"{', zk commitments' if cfg.zk.enabled else ''}{' + secure aggregation' if cfg.zk.secagg else ''}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finlora", description="Federated LoRA fine-tuning of financial LLMs.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a local multi-process federated simulation",
                         description="Run N simulated institutions and a server on this machine (Flower "
                                     "simulation engine), writing every round's global adapter.")
    sim.add_argument("--clients", type=int, default=3, help="number of simulated institutions (default 3)")
    sim.add_argument("--rounds", type=int, default=3, help="federated rounds in total (default 3)")
    sim.add_argument("--model", help="tiny | smollm2 | hub id | local path or .gguf file (config model.name)")
    sim.add_argument("--quantization", choices=["auto", "4", "8", "none"],
                     help="config model.quantization: auto = 4-bit on a GPU, none on a CPU; 4 or 8 always quantize")
    sim.add_argument("--data", help="sample | FinLoRA task | JSONL path | hub dataset id (config data.source)")
    sim.add_argument("--strategy", choices=["fedavg", "fedprox", "fedadam", "fedyogi"])
    sim.add_argument("--ffa", action="store_true", help="FFA-LoRA: freeze A at the shared seed, send only B")
    sim.add_argument("--dirichlet", type=float, metavar="ALPHA", help="label-skewed partitions Dirichlet(ALPHA)")
    sim.add_argument("--local-steps", type=int, help="optimizer steps per round (config train.local-steps)")
    sim.add_argument("--dp", action=argparse.BooleanOptionalAction, default=None,
                     help="DP-SGD on every institution (config dp.enabled)")
    sim.add_argument("--epsilon", type=float, help="target epsilon per institution over the run (dp.epsilon)")
    sim.add_argument("--delta", type=float, help="target delta; 0 = 1/(10 n_local) (dp.delta)")
    sim.add_argument("--max-grad-norm", type=float, help="DP clipping bound (dp.max-grad-norm)")
    sim.add_argument("--dp-level", choices=["sample", "client"], help="what DP protects (dp.level)")
    sim.add_argument("--zk", action=argparse.BooleanOptionalAction, default=None,
                     help="commit to, sign and verify every update; write ledger.jsonl (config zk.enabled)")
    sim.add_argument("--moe", action="append", metavar="NAME=DIR",
                     help="train a mixture-of-experts router over these frozen expert adapters instead of a LoRA "
                          "adapter (repeat; at least 2; config moe.experts; DP, zk and secure aggregation as for LoRA)")
    sim.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=None,
                     help="secure aggregation (zk.secagg, on by default with zk and 3+ clients): the server sees only "
                          "masked updates and their sum")
    sim.add_argument("--eval-every", type=int, metavar="K", help="benchmark-evaluate every K rounds (eval.every)")
    sim.add_argument("--eval-tasks", help="tasks for those evaluations, comma-separated or 'all' (eval.tasks)")
    sim.add_argument("--eval-max-samples", type=int, help="rows per task for those evaluations (eval.max-samples)")
    sim.add_argument("--final-eval", action="store_true", help="full benchmark on the final adapter (eval.final)")
    sim.add_argument("--out", default="runs", help="directory of run directories (default ./runs)")
    sim.add_argument("--run-id", help="run directory name (default sim-<timestamp>)")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last completed round")
    sim.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per simulated client")
    sim.add_argument("--gpus-per-client", type=float, default=0.0, help="Ray GPUs per simulated client")
    sim.add_argument("--app", help="Flower app directory to run (default: this finlora installation), e.g. one whose "
                                    "ClientApp is your own variant of finlora's")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="any config key of pyproject [tool.flwr.app.config], e.g. --set lora.r=16")
    sim.set_defaults(func=cmd_simulate)
    add_eval_parser(sub)
    add_serve_parser(sub)
    add_compare_parser(add_moe_parser(sub))
    add_zk_parser(sub)

    certs = sub.add_parser("certs", help="make the federation's TLS certificates and institutions' keys")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="a CA and the server certificate")
    init.add_argument("--out", required=True)
    init.add_argument("--server-name", required=True, help="HOST[,IP...] the institutions will dial")
    node = certs_sub.add_parser("node", help="an institution's node-auth key pair and zk signing key pair")
    node.add_argument("--out", required=True)
    node.add_argument("--name", required=True, help="institution name, e.g. bank-a")
    certs.set_defaults(func=cmd_certs)

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    split = data_sub.add_parser("split", help="one private JSONL per institution (rehearse a deployment)")
    split.add_argument("--task", help="a FinLoRA train task (see README)")
    split.add_argument("--data", help="a FinLoRA JSONL file")
    split.add_argument("--clients", type=int, required=True)
    split.add_argument("--dirichlet", type=float, metavar="ALPHA", help="label skew Dirichlet(ALPHA) (default IID)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--names", help="file names, comma-separated, e.g. bank-a,bank-b,bank-c (default bank-0,...)")
    split.add_argument("--out", required=True)
    split.set_defaults(func=cmd_data_split)

    dp = sub.add_parser("dp", help="an institution's privacy ledger")
    dp_sub = dp.add_subparsers(dest="dp_command", required=True)
    for name, text in (("ledger", "show what a data file has spent"),
                       ("new-period", "close the budget period of a data file (its ledger is archived, not deleted)")):
        cmd = dp_sub.add_parser(name, help=text)
        cmd.add_argument("--data", required=True, help="the institution's private JSONL (the ledger's key)")
        cmd.add_argument("--ledger-dir", help="as finlora client --dp-ledger-dir (default $FINLORA_HOME/dp-state)")
    dp.set_defaults(func=cmd_dp)

    server = sub.add_parser("server", help="run the federation's server (Flower SuperLink + the finlora run)")
    server.add_argument("--state", required=True, help="state directory (runs, SuperLink database, logs)")
    server.add_argument("--config", help="run config TOML: keys of pyproject [tool.flwr.app.config]")
    server.add_argument("--certs", help="directory with ca.crt, server.pem, server.key (default STATE/certs)")
    server.add_argument("--nodes", help="directory with the institutions' *.auth.pub and *.pub.pem keys")
    server.add_argument("--host", default="0.0.0.0",
                        help="address the Fleet gateway listens on (the SuperLink itself stays on 127.0.0.1)")
    server.add_argument("--port", type=int, default=9092, help="port the institutions connect to")
    server.add_argument("--run-id", default="federation")
    server.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (testing only)")
    server.add_argument("--app", help="Flower app directory to submit (default: this finlora installation)")
    server.add_argument("--heldout-data", metavar="sample|JSONL|none",
                        help="rows the server scores every global adapter on (default: config data.source, "
                             "'sample' = the built-in sentiment set)")
    server.add_argument("--eval-data", metavar="DIR",
                        help="FinLoRA test files for the benchmark eval (default: config eval.data-dir, else the "
                             "FinLoRA data directory's test/)")
    server.set_defaults(func=cmd_server)

    client = sub.add_parser("client", help="join a federation as an institution (Flower SuperNode)")
    client.add_argument("--superlink", required=True, help="HOST:PORT of the server")
    client.add_argument("--ca", help="the federation's CA certificate")
    client.add_argument("--key", help="this institution's node-auth private key (<name>.auth.key)")
    client.add_argument("--data", required=True, help="this institution's private FinLoRA JSONL")
    client.add_argument("--name", help="institution name (default: from the key file name)")
    client.add_argument("--sign-key", help="zk signing key (default: <name>.key beside --key)")
    client.add_argument("--zk-peers", help="directory of the institutions' public keys <name>.pub.pem, this "
                                           "institution's own copy for secure aggregation (default: beside the "
                                           "signing key)")
    client.add_argument("--state", help="local state directory (default $FINLORA_HOME/nodes/<name>)")
    client.add_argument("--gpu", type=int, help="CUDA device index to train on")
    client.add_argument("--dp-epsilon", type=float, help="this institution's own privacy budget")
    client.add_argument("--dp-delta", type=float, help="this institution's own DP delta")
    client.add_argument("--dp-max-grad-norm", type=float, help="this institution's own per-example clipping bound")
    client.add_argument("--dp-ledger-dir", metavar="DIR",
                        help="where this institution's privacy ledger lives (default $FINLORA_HOME/dp-state)")
    client.add_argument("--allow-no-dp", action="store_true",
                        help="accept runs without differential privacy (default: this institution requires DP)")
    client.add_argument("--allow-unmasked", action="store_true",
                        help="accept runs that send this institution's update without secure aggregation, e.g. a "
                             "two-institution federation (default: it requires zk.secagg)")
    client.add_argument("--app-hash", default="auto", metavar="auto|SHA256|any",
                        help="run only the app (FAB) with this hash: 'auto' (default) = this finlora installation's, "
                             "or the hash the server prints; 'any' = unpinned (not recommended)")
    client.add_argument("--max-wait-time", type=float, metavar="S",
                        help="give up after S seconds without the SuperLink (default: keep waiting for it)")
    client.add_argument("--exit-after-idle", type=float, metavar="S",
                        help="exit 0 after S seconds without a task (default: exit when the run is finished)")
    client.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (testing only)")
    client.add_argument("--no-resident", action="store_true",
                        help="no resident trainer: every Flower message loads the base model afresh (slow)")
    client.set_defaults(func=cmd_client)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (a service manager, `kill`) unwinds like Ctrl-C, so the SuperLink/SuperNode/Ray processes we
    # started are stopped by our `finally` blocks instead of being orphaned.
    for signum in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal too
        signal.signal(signum, lambda received, frame: sys.exit(128 + received))
    try:
        return int(args.func(args))
    except (ConfigError, DataError, CertificateError) as exc:  # the user's input: one line names the cause
        if args.debug:
            raise
        print(f"finlora: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("finlora: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else: one line, the traceback on request
        if args.debug:
            raise
        print(f"finlora: {type(exc).__name__}: {exc} (run 'finlora --debug ...' for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
