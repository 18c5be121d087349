"""Shared fixtures: an isolated finlora cache, offline hub, and real simulation runs reused across tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from xdist.scheduler import LoadScopeScheduling

from finlora.zk.generators import generators

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never touch the user's ~/.cache/finlora and never reach for the hub."""
    os.environ["FINLORA_HOME"] = str(tmp_path_factory.mktemp("finlora-home"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ[TEST_RUN_MARKER] = TEST_RUN_ID  # inherited by every process this test run starts
    # The Pedersen generators into this home's cache once, here: otherwise the first test's processes (a federation's
    # residents, a simulation's actor and ServerApp) all derive them at once (~1 CPU-s each) before one of them
    # has written the cache.
    generators()


TEST_RUN_MARKER = "FINLORA_TEST_RUN"
TEST_RUN_ID = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


SPREAD_FILES = {"test_deployment.py"}
"""Files whose tests go to any worker one by one: each federation test is long and its module fixture (certificates)
is cheap, so two of them run at once."""
OWN_RUN = {"test_fedadam_over_int8_updates_runs_and_resumes_with_its_moments",
           "test_failed_run_exits_nonzero_and_leaves_nothing_behind",
           "test_a_bad_proof_and_an_unregistered_key_are_rejected_under_fedprox_with_ffa_lora"}
"""Tests that start a simulation of their own and share no fixture run: spread like SPREAD_FILES' tests instead of
queueing behind ``fedavg_run``'s file on one worker."""
SAME_GROUP = {"test_zk_simulation.py": "test_simulation.py"}
"""Files that share a session fixture with another file (``fedavg_run``) run on that file's worker."""
LONGEST_FIRST = ("test_deployment.py::test_secure_aggregation_over_tls", "test_simulation.py",
                 "test_zk_simulation.py", "test_secagg_simulation.py",
                 "test_deployment.py::test_faults_at_the_door", "test_dp.py", "test_moe.py",
                 "test_update_validation.py", "test_control_plane.py", "test_deployment.py", "test_reply_attacks.py",
                 "test_smollm2.py", "test_serve.py", "test_eval.py", "test_zk_proof.py", "test_first_hour.py",
                 "test_resident.py", "test_training.py")
"""The suite's longest work (measured with ``--durations``), started first, the two TLS federations apart: each
waits on SuperNode start-ups, round timeouts and restarts part of the time, and that waiting costs nothing only while
the other worker computes. (xdist's own order puts the largest files first, which left the one-test federation scopes
for the end with one core idle; two federations side by side left both cores idle while both waited.) The files of
5-40 s (a served model, SmolLM2, the eval CLI, proofs) come next, so that the last work units are the many
sub-second tests, which even out the two workers' ends (test_serve.py alone at the end left one core idle ~30 s)."""


def _priority(nodeid: str) -> int:
    path = nodeid.rsplit("/", 1)[-1]
    return next((i for i, prefix in enumerate(LONGEST_FIRST) if path.startswith(prefix)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: _priority(item.nodeid))  # stable: each file keeps its own order


class SharedRunScheduling(LoadScopeScheduling):
    """pytest-xdist scheduling: every other file's tests stay on one worker, so a module or session fixture that runs
    a simulation (``fedavg_run``, ``secagg_run``, a served model) runs once. Work units go out in
    collection order (``LONGEST_FIRST``), not xdist's largest-file-first. (xdist's own ``loadgroup`` marks are lost
    under pytest 9, whose node ids no longer take the group suffix.)"""

    def __init__(self, config: pytest.Config, log=None) -> None:  # noqa: ANN001 - xdist's Producer
        config.option.loadscopereorder = False
        super().__init__(config, log)

    def _split_scope(self, nodeid: str) -> str:
        file, _, name = nodeid.partition("::")
        file = file.rsplit("/", 1)[-1]
        if file in SPREAD_FILES or name.split("[", 1)[0] in OWN_RUN:
            return nodeid
        return SAME_GROUP.get(file, file)


def pytest_xdist_make_scheduler(config: pytest.Config, log) -> SharedRunScheduling:  # noqa: ANN001 - xdist's Producer
    return SharedRunScheduling(config, log)


def make_random_adapter(out: Path, seed: int, scale: float = 0.5) -> None:
    """A PEFT adapter directory for the tiny model whose B matrices are random (so it changes the outputs)."""
    import numpy as np

    from finlora.common.adapter import initial_adapter, save_adapter_dir
    from finlora.common.config import load_config
    from finlora.common.model import lora_config, lora_shapes, resolve_model_path

    cfg = load_config()
    arrays = initial_adapter(lora_shapes(cfg.model, cfg.lora), seed=seed)
    rng = np.random.default_rng(seed)
    arrays = {k: v + rng.normal(0, scale, v.shape).astype(np.float32) if ".lora_B." in k else v
              for k, v in arrays.items()}
    save_adapter_dir(arrays, lora_config(cfg.lora, resolve_model_path(cfg.model.name)), out)


def _ray_cpus() -> int:
    """The CPUs Ray will see (cgroup quota and affinity included), so that one actor always fits."""
    try:
        from ray._private.utils import get_num_cpus

        return max(1, int(get_num_cpus()))
    except Exception:  # noqa: BLE001 - a private helper of Ray's: fall back to what this process may use
        return len(os.sched_getaffinity(0))


def one_actor(args: tuple[str, ...]) -> tuple[str, ...]:
    """``simulate`` with one Ray actor for all its institutions (``--cpus-per-client`` = every CPU), unless the
    test chose. The suite runs two tests at once on two cores: a second actor per simulation would only import
    torch, transformers and PEFT once more (~6 s of CPU) and contend with the other test for the same cores."""
    if args[:1] != ("simulate",) or "--cpus-per-client" in args:
        return args
    return (*args, "--cpus-per-client", str(_ray_cpus()))


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``finlora`` as a user would (a separate process), capturing its output."""
    return subprocess.run([sys.executable, "-m", "finlora.simulation.cli", *one_actor(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def popen_cli(*args: str, log: Path) -> subprocess.Popen:
    """Start ``finlora`` in the background (a server or an institution), its output in ``log``."""
    return subprocess.Popen([sys.executable, "-m", "finlora.simulation.cli", *args], cwd=REPO, env=dict(os.environ),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until ``text`` appears in ``log`` (fails if ``proc`` exits first or the time runs out)."""
    import time

    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until ``url``/health answers 200 (a ``finlora serve`` process started); fails with the log's tail if the
    process exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)


def stop_all(*procs: subprocess.Popen) -> None:
    """Terminate what is still running (finlora unwinds its Flower processes on SIGTERM) and reap it."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        p.wait(timeout=60)


def flower_processes() -> set[int]:
    """PIDs of SuperLink / Ray / Flower worker processes alive now that *this test run* started.

    A process belongs to the run when it carries the run's marker in its environment (every child inherits
    it, also after being re-parented), so someone else's SuperLink on the same machine is never counted.
    """
    import psutil

    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if not any(name in cmd for name in ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet",
                                            "gcs_server", "flwr-serverapp")):
            continue
        try:
            if p.environ().get(TEST_RUN_MARKER) == TEST_RUN_ID:
                pids.add(p.info["pid"])
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return pids


@pytest.fixture(scope="session")
def eval_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FinLoRA-format FPB and TFNS test files generated here, so benchmark evaluation runs without shared data."""
    import json

    from finlora.common.sample_data import sentiment_rows

    path = tmp_path_factory.mktemp("eval-data")
    for i, task in enumerate(("fpb", "tfns")):
        rows = sentiment_rows(n=60, seed=100 + i)
        (path / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def fedavg_run(tmp_path_factory: pytest.TempPathFactory, eval_data_dir: Path) -> dict:
    """3 institutions x 2 rounds of FedAvg on the tiny model with the defaults (sample-level DP at epsilon 8, zk)
    but committed updates sent unmasked (``--no-secagg``: these tests read them on the wire; the masked path is
    ``test_secagg_simulation.py``'s), through the real CLI, Flower and Ray. Institution 2 has its own privacy
    budget of 7: it trains round 1 (epsilon 6.5), then refuses round 2 (8 > 7), and the others carry it."""
    out = tmp_path_factory.mktemp("runs")
    before = flower_processes()
    proc = run_cli("simulate", "--clients", "3", "--rounds", "2", "--no-secagg", "--out", str(out),
                   "--run-id", "fedavg", "--set", f'eval.data-dir="{eval_data_dir}"',
                   "--set", 'dp.client-epsilons="8,8,7"')
    return {"proc": proc, "run_dir": out / "fedavg", "leftover": flower_processes() - before}
