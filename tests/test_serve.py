"""Serving a trained policy: `flowrl serve` (POST /act, msgpack or JSON, batched, greedy by
default, a bearer token) and the Ray Serve deployment (when the `serve` extra is installed).
Servers bind 127.0.0.1 only."""

from __future__ import annotations

import http.client
import io
import json
import re
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest

import flowrl
from flowrl.serve import serve_forever
from flowrl.wire import encode_array

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"num_envs_per_worker": 2, "rollout_fragment_length": 16, "train_batch_size": 32, "sgd_minibatch_size": 32,
         "num_sgd_iter": 1, "seed": 0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A PPO run on CartPole-v1, one iteration trained and checkpointed."""
    with flowrl.build("PPO", env="CartPole-v1", config=SMALL, output_dir=tmp_path_factory.mktemp("runs")) as algo:
        algo.train()
        algo.save()
        return algo.run_dir


@pytest.fixture
def served(run_dir):
    """(address, token) of `serve_forever` running in a thread on a free port."""
    out, ready, stop = io.StringIO(), threading.Event(), threading.Event()
    thread = threading.Thread(target=serve_forever, args=(str(run_dir),), daemon=True,
                              kwargs=dict(port=0, stream=out, ready=ready, stop=stop))
    thread.start()
    assert ready.wait(60)
    address = re.search(r"at (http://127\.0\.0\.1:\d+)/act", out.getvalue()).group(1)
    yield address, (run_dir / "serve_token").read_text().strip()
    stop.set()
    thread.join(10)


def post(address, body, token, content_type="application/json", path="/act"):
    host, port = address.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = json.dumps(body).encode() if content_type == "application/json" else msgpack.packb(body)
    conn.request("POST", path, data, {"Content-Type": content_type, "Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    if response.status != 200:
        return response.status, payload.decode()
    return 200, json.loads(payload) if content_type == "application/json" else msgpack.unpackb(payload)


def observations(n, seed=0):
    return np.random.default_rng(seed).uniform(-0.2, 0.2, size=(n, 4)).astype(np.float32)


def test_act_gives_the_greedy_actions_of_the_trained_policy_in_json_and_msgpack(served, run_dir):
    address, token = served
    trained = flowrl.load_policy(run_dir)
    for n in (1, 64):
        obs = observations(n, seed=n)
        expected = [trained.compute_action(o) for o in obs]
        status, answer = post(address, {"v": 1, "obs": obs.tolist()}, token)
        assert status == 200 and answer == {"v": 1, "actions": expected}
        status, answer = post(address, {"v": 1, "obs": encode_array(obs)}, token, "application/msgpack")
        actions = np.frombuffer(answer["actions"]["data"], dtype=answer["actions"]["dtype"])
        assert status == 200 and actions.tolist() == expected and answer["actions"]["shape"] == [n]
    assert sum(expected) not in (0, 64)  # the policy acts on the observations (both actions occur)


def test_act_samples_when_asked(served):
    address, token = served
    obs = np.zeros((256, 4), np.float32)  # one observation, many times: sampling gives both actions
    status, answer = post(address, {"v": 1, "obs": obs.tolist(), "explore": True}, token)
    assert status == 200 and set(answer["actions"]) == {0, 1}


@pytest.mark.parametrize("body, token, status, reason", [
    ({"v": 1, "obs": [[0.0] * 4]}, "wrong", 401, "wrong token"),
    ({"v": 1, "obs": [[0.0] * 3]}, None, 400, "shape [1, 3], expected [1, 4]"),
    ({"v": 1, "obs": [0.0] * 4}, None, 400, "shape [4], expected [4, 4]"),
    ({"v": 1, "obs": []}, None, 400, "a batch of 1 to 4096 observations"),
    ({"v": 1, "obs": [[0.0] * 4] * 4097}, None, 400, "a batch of 1 to 4096 observations"),
    ({"v": 1, "obs": [["a"] * 4]}, None, 400, "expected numbers"),
    ({"v": 1}, None, 400, "missing field 'obs'"),
    ({"v": 7, "obs": [[0.0] * 4]}, None, 400, "unsupported wire version 7"),
    ({"v": 1, "obs": [[0.0] * 4], "explore": "yes"}, None, 400, "field 'explore' must be true or false"),
])
def test_bad_requests_get_one_line_and_the_server_goes_on(served, body, token, status, reason):
    address, good = served
    got, text = post(address, body, token or good)
    assert got == status and reason in text and text.count("\n") == 1
    assert post(address, {"v": 1, "obs": [[0.0] * 4]}, good)[0] == 200


def test_flowrl_serve_command(run_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "flowrl.cli", "serve", str(run_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        address = re.search(r"at (http://127\.0\.0\.1:\d+)/act, greedy; token in (\S+);", line)
        assert address, line
        token_file = Path(address.group(2))
        assert token_file == run_dir / "serve_token" and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        status, answer = post(address.group(1), {"v": 1, "obs": [[0.0, 0.0, 0.0, 0.0]]},
                              token_file.read_text().strip())
        assert status == 200 and answer["actions"] in ([0], [1])
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip().endswith("flowrl serve: stopped")


def test_flowrl_serve_refuses_a_non_loopback_host_without_a_token_file(run_dir):
    out = subprocess.run([sys.executable, "-m", "flowrl.cli", "serve", str(run_dir), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "flowrl: error: --token-file: binding to 0.0.0.0 (not a loopback address) needs a token file"]


def test_flowrl_serve_uses_a_given_token_file(run_dir, tmp_path):
    (tmp_path / "token").write_text("given-token\n")
    out, ready, stop = io.StringIO(), threading.Event(), threading.Event()
    thread = threading.Thread(target=serve_forever, args=(str(run_dir),), daemon=True,
                              kwargs=dict(port=0, token_file=str(tmp_path / "token"), stream=out, ready=ready,
                                          stop=stop))
    thread.start()
    assert ready.wait(60)
    address = re.search(r"at (http://127\.0\.0\.1:\d+)/act", out.getvalue()).group(1)
    try:
        assert post(address, {"v": 1, "obs": [[0.0] * 4]}, "given-token")[0] == 200
    finally:
        stop.set()
        thread.join(10)


def test_a_run_trained_by_external_clients_without_an_env_is_served_from_its_spaces(tmp_path):
    spaces = {"observation_space": {"type": "Box", "low": -1.0, "high": 1.0, "shape": [3]},
              "action_space": {"type": "Discrete", "n": 5}}
    config = {"input": "external", "external": {"port": 0, **spaces}, "seed": 0}
    with flowrl.build("PPO", config=config, output_dir=tmp_path) as algo:
        algo.save()  # no client ever came: the initial policy, as a checkpoint
        run = algo.run_dir
    trained = flowrl.load_policy(run)
    assert trained.env is None and trained.policy.observation_space.shape == (3,)
    assert trained.compute_action(np.zeros(3, np.float32)) in range(5)
    with pytest.raises(flowrl.ExperimentError, match="names no env to evaluate"):
        trained.evaluate(1)


def _ray_serve_missing() -> str | None:
    import importlib

    try:
        importlib.import_module("ray.serve")
    except ImportError as e:
        return f"Ray Serve is not installed (pip install 'flowrl[serve]'): {e}"
    return None


@pytest.mark.skipif(_ray_serve_missing() is not None, reason=str(_ray_serve_missing()))
def test_ray_serve_deployment_answers_like_flowrl_serve(run_dir, ray_session):
    from ray import serve

    from flowrl.serve import deployment

    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    try:
        serve.run(deployment(str(run_dir)), name="flowrl", route_prefix="/act")
        token = (run_dir / "serve_token").read_text().strip()
        trained = flowrl.load_policy(run_dir)
        obs = observations(8)
        status, answer = post("http://127.0.0.1:8123", {"v": 1, "obs": obs.tolist()}, token)
        assert status == 200 and answer["actions"] == [trained.compute_action(o) for o in obs]
        assert post("http://127.0.0.1:8123", {"v": 1, "obs": obs.tolist()}, "wrong")[0] == 401
    finally:
        serve.shutdown()
