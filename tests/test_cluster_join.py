"""Joining a Ray cluster by address: a bounded wait, a token taken along, one line on failure.

The head is started here (`ray start --head --block`) with a temp dir of its own, so that no
other Ray on this machine finds it (`ray.init()` looks for the last `ray start` in /tmp/ray),
and ended by its PID, never by `ray stop` (which ends every Ray process on the machine).
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from flowrl.testing import ctrl_c

RAY = Path(sys.executable).with_name("ray")
TINY = {"tiny": {"env": "CartPole-v1", "run": "PPO", "stop": {"timesteps_total": 256},
                 "config": {"train_batch_size": 128, "sgd_minibatch_size": 64, "num_sgd_iter": 1,
                            "num_envs_per_worker": 2, "rollout_fragment_length": 64, "seed": 0}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def clean_env(home: Path) -> dict:
    """This process's environment without Ray's auth and address settings (ray.init in this
    test session sets RAY_AUTH_MODE), with HOME where the test puts ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env["HOME"] = str(home)
    return env


def flowrl_run(tmp_path, home, *args, timeout=90):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(TINY))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flowrl.cli", "run", str(plan), "--output-dir", str(tmp_path / "runs"),
                           "--quiet", *args], capture_output=True, text=True, env=clean_env(home), timeout=timeout)
    return proc, time.monotonic() - t0


def home_with_token(root: Path, token: str) -> Path:
    (root / ".ray").mkdir(parents=True)
    (root / ".ray" / "auth_token").write_text(token)
    return root


def test_a_dead_port_fails_within_the_timeout_with_one_line(tmp_path):
    port = free_port()
    proc, elapsed = flowrl_run(tmp_path, tmp_path, "--address", f"127.0.0.1:{port}", "--connect-timeout", "5")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"flowrl: error: cannot join the Ray cluster at 127.0.0.1:{port}: connection refused")
    assert "ray start --head" in lines[0]
    assert elapsed < 20


@pytest.fixture(scope="module")
def token_head():
    """A one-CPU head with token authentication; yields (port, token)."""
    token = secrets.token_hex(32)
    temp_dir = Path(tempfile.mkdtemp(prefix="frl", dir="/tmp"))  # short: Ray's socket paths must fit
    (temp_dir / "token").write_text(token)
    env = clean_env(Path.home())
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(temp_dir / "token"))
    port = free_port()
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
                             "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp_dir / "r")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list((temp_dir / "r").glob("session_*/logs/raylet.out")) and time.monotonic() < deadline:
            assert head.poll() is None, "ray start --head exited"
            time.sleep(0.25)
        time.sleep(1.0)  # the raylet registers with the GCS
        yield port, token
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` ends the processes it started
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its own session: only what this test started
            head.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_joining_a_token_cluster_by_address_takes_the_local_token(tmp_path, token_head):
    port, token = token_head
    home = home_with_token(tmp_path / "home", token)
    proc, _ = flowrl_run(tmp_path, home, "--address", f"127.0.0.1:{port}", "--num-workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "tiny: done at iteration 2" in proc.stdout


def test_a_wrong_token_fails_within_the_timeout_with_one_line(tmp_path, token_head):
    port, _ = token_head
    home = home_with_token(tmp_path / "home", "not-the-token")
    proc, elapsed = flowrl_run(tmp_path, home, "--address", f"127.0.0.1:{port}", "--connect-timeout", "3")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == (f"flowrl: error: cannot join the Ray cluster at 127.0.0.1:{port}: the cluster uses token "
                        f"authentication and refused the token from {home / '.ray' / 'auth_token'}; copy the "
                        "cluster's token (`ray get-auth-token` on the head) into ~/.ray/auth_token, or set "
                        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    assert elapsed < 20


@pytest.fixture
def silent_port():
    """A port that takes TCP connections but never answers, as a wrong service would."""
    with socket.socket() as listener:
        listener.bind(("", 0))
        listener.listen(4096)
        yield listener.getsockname()[1]


def test_a_port_that_never_answers_fails_within_the_timeout(tmp_path, silent_port):
    proc, elapsed = flowrl_run(tmp_path, tmp_path, "--address", f"127.0.0.1:{silent_port}", "--connect-timeout", "2")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # (Ray's C++ client, still waiting in its thread, may log a warning of its own before exit.)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("flowrl: error:")]
    assert errors == [f"flowrl: error: cannot join the Ray cluster at 127.0.0.1:{silent_port}: the port answers but "
                      "no Ray GCS replied within 2 s; check the address (`ray start --head` prints it; `ray status` "
                      "on a node shows it) and that the head runs, or use --address auto on a node of the cluster"]
    assert elapsed < 25


def test_ctrl_c_stops_the_wait_for_a_cluster(tmp_path, silent_port):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(TINY))
    proc = subprocess.Popen([sys.executable, "-m", "flowrl.cli", "run", str(plan), "--address",
                             f"127.0.0.1:{silent_port}", "--connect-timeout", "120",
                             "--output-dir", str(tmp_path / "runs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(tmp_path))
    time.sleep(6)  # imports done, ray.init waiting on the silent port
    running = proc.poll() is None
    err, elapsed = ctrl_c(proc)
    assert running and proc.returncode == 130, err
    assert "flowrl: interrupted" in err and "Traceback" not in err
    assert elapsed < 3
