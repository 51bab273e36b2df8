"""The README's cluster recipe on this machine, with real processes: `ray start --head` (dashboard and job server
on 127.0.0.1), `ray status` against it, `ray job submit` of a tiny `sluice train --orchestrator ray --ray-address
auto` with a working directory that carries the reward plug-in, `ray job logs -f` until the job ends, then its
status, log lines, metrics, plots and summary.

Ray's token authentication is on, set up as the README says: one token (RAY_AUTH_TOKEN, with RAY_AUTH_MODE=token)
in the environment of `ray start` and of every `ray` command that talks to the head. The head runs under
`ray start --block` in its own session, so stopping it stops only the processes this test started (`ray stop`
would stop every Ray instance on the machine, other tests' included).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import sluice
from sluice.observability.metrics import read_metrics
from helpers.servers import free_ports
from helpers.train_loop import flags

NUM_ROLLOUT = 2
HEAD_START_TIMEOUT_S = 60.0
HEAD_STOP_TIMEOUT_S = 20.0
JOB_TIMEOUT_S = 150.0
RAY = str(Path(sys.executable).with_name("ray"))  # the ray command of this Python environment
# The job imports the sluice under test: a user's nodes have it installed (./sluice.sh), which here may be
# another checkout, so the job's runtime environment puts this one's source first.
SLUICE_SOURCE = str(Path(sluice.__file__).resolve().parents[1])
REWARD_PLUGIN = """\
async def reward(sample):
    return 1.0 if sample.response.strip() == str(sample.label) else 0.0
"""


@dataclass(frozen=True)
class RayHead:
    gcs_address: str  # 127.0.0.1:PORT, for `ray status --address` and `ray start --address` on other nodes
    dashboard_url: str  # http://127.0.0.1:PORT, for `ray job ...  --address`
    env: dict[str, str]  # what every `ray` command runs with: the venv's PATH, the cluster's token


def ray_command(head: RayHead, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=head.env, capture_output=True, text=True, timeout=timeout)


def cluster_status(head: RayHead) -> str:
    """`ray status` once the head has reported its first status (a few seconds after it starts)."""
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while True:
        status = ray_command(head, "status", "--address", head.gcs_address)
        assert status.returncode == 0, status.stdout + status.stderr
        if not status.stdout.startswith("No cluster status") or time.monotonic() > deadline:
            return status.stdout
        time.sleep(1)


def wait_for_dashboard(process: subprocess.Popen, url: str, token: str, log: Path) -> None:
    """Until the job server answers an authenticated request; fails with `ray start`'s output if it exits."""
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()}")
        try:
            answer = httpx.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=2)
            if answer.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the job server at {url} did not answer within {HEAD_START_TIMEOUT_S:.0f} s:\n{log.read_text()}")


def stop_head(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops the head's processes), then SIGKILL to whatever of its session
    is left: the processes it started, and no others."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=HEAD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture
def ray_head(tmp_path_factory):
    """A one-node Ray cluster of 2 CPUs, started as the README does, stopped at the end even on failure."""
    temp_dir = tmp_path_factory.mktemp("rayhead")  # its own session files: nothing else's ray.init() finds it
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # `python` = this venv
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port, client_server_port, agent_port = free_ports(4)
    log = temp_dir / "ray_start.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--port", str(gcs_port), "--num-cpus", "2", "--num-gpus", "0",
             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
             # ports whose defaults are fixed numbers, taken by any other head on the machine
             "--ray-client-server-port", str(client_server_port), "--dashboard-agent-listen-port", str(agent_port),
             "--temp-dir", str(temp_dir), "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        head = RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", env)
        wait_for_dashboard(process, head.dashboard_url, token, log)
        yield head
    finally:
        stop_head(process)


def test_a_run_submitted_as_a_ray_job(ray_head, say7, tmp_path):
    root, model, data = say7
    status = cluster_status(ray_head)
    assert "Active:\n 1 node_" in status and "0.0/2.0 CPU" in status

    working_dir = tmp_path / "job"
    working_dir.mkdir()
    (working_dir / "say7_reward.py").write_text(REWARD_PLUGIN)
    run_dir = tmp_path / "run"
    argv = flags(model, data, run_dir, tmp_path / "ckpt", NUM_ROLLOUT, "--orchestrator", "ray",
                 "--ray-address", "auto")
    index = argv.index("--rm-type")
    argv[index:index + 2] = ["--custom-rm-path", "say7_reward.reward"]  # imported from the working directory
    job_id = f"sluice-{secrets.token_hex(4)}"
    submit = ray_command(ray_head, "job", "submit", "--address", ray_head.dashboard_url, "--submission-id", job_id,
                         "--no-wait", "--working-dir", str(working_dir),
                         "--runtime-env-json", f'{{"env_vars": {{"PYTHONPATH": "{SLUICE_SOURCE}"}}}}',
                         "--", "python", "-m", "sluice.cli", "train", *argv)
    assert submit.returncode == 0, submit.stderr
    # follows the job's output until it ends, then prints its status
    logs = ray_command(ray_head, "job", "logs", "-f", job_id, "--address", ray_head.dashboard_url,
                       timeout=JOB_TIMEOUT_S)
    assert f"Job '{job_id}' succeeded" in logs.stdout, logs.stdout + logs.stderr

    assert "Ray: joined the cluster at" in logs.stdout and "(--ray-address=auto): 1 node(s), 2 CPU" in logs.stdout
    assert "starts its own Ray" not in logs.stdout
    assert f"step {NUM_ROLLOUT}/{NUM_ROLLOUT}" in logs.stdout and "engines: http://127.0.0.1:" in logs.stdout
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, NUM_ROLLOUT + 1))
    assert all(0.0 <= r["rollout/reward_mean"] <= 1.0 for r in records)
    assert (run_dir / "summary.html").stat().st_size > 0 and list((run_dir / "plots").glob("*.png"))
