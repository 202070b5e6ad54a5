"""The policy server for external applications (flowrl.connectors.external) and
flowrl.client.PolicyClient: rows built exactly from client requests, malformed requests
refused without reaching a batch, abandoned episodes, tokens, local inference, many client
processes at once, and PPO (and DQN) trained only through external clients.

Every server here binds 127.0.0.1 on a free port; every client loop is bounded."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from flowrl.client import PolicyClient, PolicyServerError
from flowrl.config import ConfigError, parse_config
from flowrl.connectors.external import ExternalInput
from flowrl.plan import Plan
from flowrl.plans import DQNConfig, PPOConfig, build_dqn_plan, build_ppo_plan
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.wire import encode_array

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "examples" / "external_client.py"
SPACES = {"observation_space": {"type": "Box", "low": -10.0, "high": 10.0, "shape": [2]},
          "action_space": {"type": "Discrete", "n": 3}}


def make_server(config_class=PPOConfig, env=None, **config):
    """An ExternalInput (started) and its WorkerSet, from a plan config with input: external."""
    external = {"port": 0, **config.pop("external", {})}
    if env is None:
        external.update(SPACES)
    cfg = parse_config(config_class, {"input": "external", "external": external, "seed": 0, **config})
    kw = cfg.worker_kwargs(env)
    source = ExternalInput.from_config(cfg, kw)
    workers = WorkerSet(input_source=source, **kw)
    return source, workers, cfg


@pytest.fixture
def server():
    """A server for obs Box(2), actions Discrete(3), taking batches of 4 rows."""
    source, workers, _ = make_server(num_envs_per_worker=1, rollout_fragment_length=4,
                                     external={"max_body_bytes": 4096, "request_timeout_s": 2.0})
    source.start(workers)
    yield source
    source.stop()


def post(source, path, body, token=None, content_type="application/msgpack", raw=False):
    """(status, answer) of one request; the answer decoded (msgpack or JSON) when it is a 200."""
    host, port = source.address.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": content_type}
    if token is not False:
        headers["Authorization"] = f"Bearer {token or source.token}"
    data = body if raw else (msgpack.packb(body, use_bin_type=True) if content_type.endswith("msgpack")
                             else json.dumps(body).encode())
    conn.request("POST", path, data, headers)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    if response.status != 200:
        return response.status, payload.decode()
    return 200, msgpack.unpackb(payload) if response.getheader("Content-Type") == "application/msgpack" \
        else json.loads(payload)


def obs(x, y):
    return encode_array(np.array([x, y], dtype=np.float32))


# ---- rows, exactly ----------------------------------------------------------------------------
def test_interleaved_episodes_become_rows_in_time_order_with_rewards_and_bootstrap(server):
    """Two episodes step in turn; the batch holds each episode's rows together, in order, with
    the rewards given since each action (log_returns and a request's `reward` add up), and
    next_vf_preds: the next row's vf_preds, 0 after a termination, V(new_obs) after a truncation."""
    a = post(server, "/start_episode", {"v": 1})[1]["episode_id"]
    b = post(server, "/start_episode", {"v": 1})[1]["episode_id"]
    assert a != b
    steps = [(a, "/get_action", {"obs": obs(0, 0)}), (b, "/get_action", {"obs": obs(5, 5)}),
             (a, "/log_returns", {"reward": 1.0}), (a, "/log_returns", {"reward": 0.5}),
             (a, "/get_action", {"obs": obs(1, 0)}), (b, "/get_action", {"obs": obs(6, 5), "reward": 2.0}),
             (a, "/end_episode", {"obs": obs(2, 0), "reward": 3.0}),
             (b, "/end_episode", {"obs": obs(7, 5), "reward": 4.0, "truncated": True})]
    for episode, path, fields in steps:
        status, answer = post(server, path, {"v": 1, "episode_id": episode, **fields})
        assert status == 200, answer
        if path == "/get_action":
            assert answer["action"] in (0, 1, 2)
    batch = server.sample()
    assert batch["eps_id"].tolist() == [a, a, b, b]
    assert batch["t"].tolist() == [0, 1, 0, 1]
    assert batch["obs"].tolist() == [[0, 0], [1, 0], [5, 5], [6, 5]]
    assert batch["new_obs"].tolist() == [[1, 0], [2, 0], [6, 5], [7, 5]]
    assert batch["rewards"].tolist() == [1.5, 3.0, 2.0, 4.0]
    assert batch["terminateds"].tolist() == [False, True, False, False]
    assert batch["truncateds"].tolist() == [False, False, False, True]
    vf, next_vf = batch["vf_preds"], batch["next_vf_preds"]
    v_last_b = server.policy.value(np.array([[7, 5]], dtype=np.float32))[0]
    np.testing.assert_allclose(next_vf, [vf[1], 0.0, vf[3], v_last_b], rtol=1e-6)
    assert sorted(batch.episodes) == [(4.5, 2), (6.0, 2)]
    # The log-probability recorded is that of the action returned, under the acting policy.
    dist_inputs, _ = server.policy.model(server.policy.to_tensor(np.array(batch["obs"])))
    logp = server.policy.dist(dist_inputs).log_prob(server.policy.to_tensor(np.array(batch["actions"])).long())
    np.testing.assert_allclose(batch["action_logp"], logp.detach().numpy(), rtol=1e-5)
    assert set(batch.columns) == {"obs", "new_obs", "actions", "rewards", "terminateds", "truncateds", "eps_id", "t",
                                  "action_logp", "vf_preds", "next_vf_preds", "weights_version"}


def test_log_action_records_the_clients_action_and_json_bodies_work(server):
    status, answer = post(server, "/start_episode", {"v": 1}, content_type="application/json")
    episode = answer["episode_id"]
    for i, action in enumerate([2, 0, 1, 2]):
        status, answer = post(server, "/log_action", {"v": 1, "episode_id": episode, "obs": [float(i), 0.0],
                                                     "action": action}, content_type="application/json")
        assert (status, answer) == (200, {"v": 1})
    post(server, "/end_episode", {"v": 1, "episode_id": episode, "obs": [4.0, 0.0]}, content_type="application/json")
    batch = server.sample()
    assert batch["actions"].tolist() == [2, 0, 1, 2]
    assert batch["obs"][:, 0].tolist() == [0, 1, 2, 3]


def test_episode_rows_longer_than_a_batch_continue_in_the_next():
    server, workers, _ = make_server(num_envs_per_worker=1, rollout_fragment_length=4,
                                     external={"max_buffered_rows": 8})
    server.start(workers)
    episode = post(server, "/start_episode", {"v": 1})[1]["episode_id"]
    for i in range(6):  # the reward of each step comes with the next request
        reward = {"reward": 1.0} if i else {}
        assert post(server, "/get_action", {"v": 1, "episode_id": episode, "obs": obs(i, 0), **reward})[0] == 200
    post(server, "/end_episode", {"v": 1, "episode_id": episode, "obs": obs(6, 0), "reward": 1.0})
    # 6 rows complete, 4 to a batch: the first batch cuts the episode and bootstraps at the cut.
    first = server.sample()
    assert first["t"].tolist() == [0, 1, 2, 3] and not first["terminateds"].any() and first.episodes == []
    v4 = server.policy.value(np.array([[4, 0]], dtype=np.float32))[0]
    assert first["next_vf_preds"][-1] == pytest.approx(v4, rel=1e-6)
    post(server, "/start_episode", {"v": 1})  # nothing more: the next batch needs 2 more rows
    other = post(server, "/start_episode", {"v": 1})[1]["episode_id"]
    for i in range(3):
        post(server, "/get_action", {"v": 1, "episode_id": other, "obs": obs(9, i)})
    second = server.sample()
    assert second["eps_id"].tolist() == [episode, episode, other, other]
    assert second["t"].tolist() == [4, 5, 0, 1]
    assert second["terminateds"].tolist() == [False, True, False, False]
    assert second.episodes == [(6.0, 6)]  # reported with its last row
    server.stop()


# ---- refusals ---------------------------------------------------------------------------------
def test_malformed_requests_get_a_4xx_with_one_line_and_never_reach_a_batch(server):
    episode = post(server, "/start_episode", {"v": 1})[1]["episode_id"]
    good = {"v": 1, "episode_id": episode, "obs": obs(1, 1)}
    cases = [
        ("no token", 401, "/get_action", good, {"token": False}),
        ("wrong token", 401, "/get_action", good, {"token": "not-the-token"}),
        ("bad msgpack", 400, "/get_action", b"\xc1\x00garbage", {"raw": True}),
        ("not a map", 400, "/get_action", [1, 2], {}),
        ("no version", 400, "/get_action", {k: v for k, v in good.items() if k != "v"}, {}),
        ("wrong version", 400, "/get_action", {**good, "v": 2}, {}),
        ("wrong shape", 400, "/get_action", {**good, "obs": encode_array(np.zeros(3, np.float32))}, {}),
        ("wrong dtype", 400, "/get_action", {**good, "obs": encode_array(np.zeros(2, np.float64))}, {}),
        ("short data", 400, "/get_action", {**good, "obs": {"dtype": "<f4", "shape": [2], "data": b"\0" * 7}}, {}),
        ("list of strings", 400, "/get_action", {**good, "obs": ["a", "b"]}, {}),
        ("NaN", 400, "/get_action", {**good, "obs": [float("nan"), 0.0]}, {}),
        ("infinite reward", 400, "/get_action", {**good, "reward": float("inf")}, {}),
        ("unknown episode", 404, "/get_action", {**good, "episode_id": episode + 1}, {}),
        ("episode id a string", 400, "/get_action", {**good, "episode_id": str(episode)}, {}),
        ("action out of range", 400, "/log_action", {**good, "action": 3}, {}),
        ("action a float", 400, "/log_action", {**good, "action": 1.5}, {}),
        ("reward before any action", 409, "/log_returns", {"v": 1, "episode_id": episode, "reward": 1.0}, {}),
        ("truncated not a bool", 400, "/end_episode", {**good, "truncated": "yes"}, {}),
        ("body over the limit", 413, "/get_action", {**good, "pad": b"x" * 5000}, {}),
        ("unknown endpoint", 404, "/nowhere", good, {}),
        ("wrong content type", 415, "/get_action", b"{}", {"raw": True, "content_type": "text/plain"}),
        ("extension type", 400, "/get_action", msgpack.packb({**good, "x": msgpack.ExtType(5, b"ab")}),
         {"raw": True}),
        ("experience not Arrow", 400, "/experience", {"v": 1, "rows": b"not arrow"}, {}),
    ]
    for name, status, path, body, options in cases:
        got, reason = post(server, path, body, **options)
        assert got == status, f"{name}: {got} {reason}"
        assert reason.endswith("\n") and "\n" not in reason[:-1] and reason.strip(), f"{name}: {reason!r}"
    assert server.server.rejected == len(cases)
    # The server still serves, and only the good requests made rows.
    for i in range(4):
        assert post(server, "/get_action", {**good, "obs": obs(i, i)})[0] == 200
    post(server, "/end_episode", {**good, "obs": obs(4, 4)})
    batch = server.sample()
    assert batch["obs"].tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert batch["rewards"].tolist() == [0, 0, 0, 0]


def test_malformed_experience_rows_are_refused(server):
    episode = post(server, "/start_episode", {"v": 1})[1]["episode_id"]

    def rows(**changes):
        n = 2
        columns = {"eps_id": np.full(n, episode, np.int64), "obs": np.zeros((n, 2), np.float32),
                   "new_obs": np.ones((n, 2), np.float32), "actions": np.array([0, 2]),
                   "rewards": np.ones(n, np.float32), "terminateds": np.array([False, True]),
                   "truncateds": np.zeros(n, bool), "action_logp": np.zeros(n, np.float32),
                   "vf_preds": np.zeros(n, np.float32), "weights_version": np.zeros(n, np.int64)}
        columns.update(changes)
        columns = {k: v for k, v in columns.items() if v is not None}
        return {"v": 1, "rows": SampleBatch(columns).to_ipc().to_pybytes()}

    bad = {"missing column": rows(vf_preds=None), "extra column": rows(extra=np.zeros(2)),
           "obs shape": rows(obs=np.zeros((2, 3), np.float32)), "obs dtype": rows(obs=np.zeros((2, 2))),
           "action out of range": rows(actions=np.array([0, 3])), "NaN reward": rows(rewards=np.array([1, np.nan],
                                                                                                    np.float32)),
           "unknown episode": rows(eps_id=np.array([episode, episode + 1])),
           "rows after the end": rows(terminateds=np.array([True, False]))}
    for name, body in bad.items():
        status, reason = post(server, "/experience", body)
        assert status in (400, 404), f"{name}: {status} {reason}"
    assert post(server, "/experience", rows())[0] == 200
    assert len(server.rows) == 2 and server.episodes == {}


def test_an_abandoned_episode_is_dropped_counted_and_its_complete_rows_kept():
    source, workers, _ = make_server(num_envs_per_worker=1, rollout_fragment_length=4,
                                     external={"episode_timeout_s": 0.3})
    plan = Plan(workers.input_source.stream(workers))
    with plan:
        source.start(workers)
        client = PolicyClient(source.address, source.token)
        gone = client.start_episode()
        for i in range(3):  # 2 complete rows, then an action that never gets its next observation
            client.get_action(gone, np.array([i, 0], np.float32))
        time.sleep(0.5)
        done = threading.Event()

        def live():  # another client fills the batch after the first has gone silent
            episode = client.start_episode()
            for i in range(2):
                client.get_action(episode, np.array([9, i], np.float32))
            client.end_episode(episode, np.array([9, 2], np.float32))
            done.set()

        thread = threading.Thread(target=live)
        thread.start()
        result = plan.step()
        thread.join(10)
        assert done.is_set()
    batch = result["output"]
    assert result["num_abandoned_episodes"] == 1
    assert result["external_address"] == source.address
    assert batch["eps_id"].tolist()[:2] == [gone, gone] and batch["t"].tolist() == [0, 1, 0, 1]
    assert len(batch.episodes) == 1  # only the live one finished
    with pytest.raises(ConnectionError):  # the plan closed: its server is gone
        client.get_action(gone, np.zeros(2, np.float32))


def test_a_request_times_out_with_503_while_the_plan_takes_nothing(server):
    client = PolicyClient(server.address, server.token, busy_timeout_s=0.0)
    episode = client.start_episode()
    for i in range(5):  # 4 complete rows fill the buffer (one batch)
        client.get_action(episode, np.array([i, 0], np.float32))
    t0 = time.monotonic()
    with pytest.raises(PolicyServerError) as e:
        client.get_action(episode, np.array([5, 0], np.float32))
    assert e.value.status == 503 and time.monotonic() - t0 >= 1.9  # request_timeout_s: 2
    assert len(server.sample()) == 4  # the refused step did not become a row
    client.get_action(episode, np.array([5, 0], np.float32))  # room again


def test_too_many_open_episodes_get_429():
    source, workers, _ = make_server(external={"max_open_episodes": 2})
    source.start(workers)
    try:
        assert [post(source, "/start_episode", {"v": 1})[0] for _ in range(3)] == [200, 200, 429]
    finally:
        source.stop()


# ---- tokens and config --------------------------------------------------------------------------
def test_a_generated_token_is_written_to_the_run_directory_for_its_owner_only(tmp_path):
    source, workers, _ = make_server()
    source.run_dir = tmp_path
    source.start(workers)
    try:
        path = tmp_path / "external_token"
        assert path.read_text().strip() == source.token and len(source.token) >= 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert post(source, "/start_episode", {"v": 1}, token=path.read_text().strip())[0] == 200
    finally:
        source.stop()


def test_a_given_token_file_is_used(tmp_path):
    (tmp_path / "token").write_text("s3cret-token\n")
    source, workers, _ = make_server(external={"token_file": str(tmp_path / "token")})
    source.start(workers)
    try:
        assert post(source, "/start_episode", {"v": 1}, token="s3cret-token")[0] == 200
        assert post(source, "/start_episode", {"v": 1}, token="s3cret")[0] == 401
        assert not (tmp_path / "external_token").exists()
    finally:
        source.stop()


@pytest.mark.parametrize("external, key, message", [
    ({"host": "0.0.0.0"}, "config.external.token_file", "not a loopback address) needs a token file"),
    ({"port": 70000}, "config.external.port", "must be in [0, 65535]"),
    ({"prot": 1}, "config.external.prot", "did you mean 'port'?"),
    ({"observation_space": {"type": "Box", "shape": [2]}}, "config.external.action_space", "give both"),
    ({"observation_space": {"type": "Boxx"}, "action_space": {"type": "Discrete", "n": 2}},
     "config.external.observation_space", "unknown space type 'Boxx'"),
])
def test_bad_external_settings_name_the_key(external, key, message):
    with pytest.raises(ConfigError) as e:
        parse_config(PPOConfig, {"input": "external", "external": external})
    assert str(e.value).startswith(key + ":") and message in str(e.value)


def test_input_and_external_keys_are_checked():
    with pytest.raises(ConfigError, match="config.input: must be null or external"):
        parse_config(PPOConfig, {"input": "data/*.parquet"})
    with pytest.raises(ConfigError, match="config.external: settings of the policy server, but input is not"):
        parse_config(PPOConfig, {"external": {"port": 9901}})
    with pytest.raises(ConfigError, match="config.num_workers: must be 0 with input: external"):
        parse_config(PPOConfig, {"input": "external", "num_workers": 2})


def test_binding_a_non_loopback_host_without_a_token_file_is_refused_in_one_line(tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("x:\n  env: CartPole-v1\n  run: PPO\n  stop: {timesteps_total: 1000}\n"
                         "  config: {input: external, external: {host: 0.0.0.0, port: 9900}}\n")
    out = subprocess.run([sys.executable, "-m", "flowrl.cli", "run", str(plan_file), "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"flowrl: error: {plan_file}: experiment 'x': config.external.token_file: binding to 0.0.0.0 (not a "
        "loopback address) needs a token file"]
    assert not (tmp_path / "x").exists()


# ---- the client --------------------------------------------------------------------------------
def test_local_inference_acts_with_pulled_weights_and_sends_rows_in_batches():
    source, workers, _ = make_server(num_envs_per_worker=1, rollout_fragment_length=4)
    source.start(workers)
    try:
        client = PolicyClient(source.address, source.token, inference="local", update_interval=0.0, batch_rows=4,
                              flush_interval_s=3600)
        learner = workers.policy
        for name, value in learner.get_weights().items():
            np.testing.assert_array_equal(client.policy.get_weights()[name].numpy(), value.numpy())
        episode = client.start_episode()
        actions = [client.get_action(episode, np.array([i, -i], np.float32)) for i in range(3)]
        client.log_returns(episode, 1.0)
        client.log_action(episode, np.array([3, -3], np.float32), 2)
        assert len(source.rows) == 0  # held by the client
        client.end_episode(episode, np.array([4, -4], np.float32))
        assert len(source.rows) == 4  # batch_rows reached: sent as one request
        client.close()
        batch = source.sample()
    finally:
        source.stop()
    assert batch["actions"].tolist()[:3] == actions and batch["actions"][3] == 2
    assert batch["obs"][:, 0].tolist() == [0, 1, 2, 3] and batch["new_obs"][:, 0].tolist() == [1, 2, 3, 4]
    assert batch["rewards"].tolist() == [0, 0, 1, 0] and batch["terminateds"].tolist() == [False] * 3 + [True]
    assert batch.episodes == [(1.0, 4)]
    dist_inputs, vf = client.policy.model(client.policy.to_tensor(np.array(batch["obs"])))
    expected = client.policy.dist(dist_inputs).log_prob(client.policy.to_tensor(np.array(batch["actions"])).long())
    np.testing.assert_allclose(batch["action_logp"], expected.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(batch["vf_preds"], vf.detach().numpy(), rtol=1e-5)


def test_local_inference_picks_up_new_weights():
    source, workers, _ = make_server(num_envs_per_worker=1, rollout_fragment_length=2)
    source.start(workers)
    try:
        client = PolicyClient(source.address, source.token, inference="local", update_interval=3600)
        with torch_no_grad():
            for p in workers.policy.model.parameters():
                p.add_(1.0)
        workers.policy.weights_version = 7
        assert client.pull_weights() is False  # the server acts with what it had at the last sample()
        threading.Thread(target=source.sample, daemon=True).start()  # takes the learner's weights
        deadline = time.monotonic() + 5
        while not client.pull_weights() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client._weights_version == 7
        for name, value in workers.policy.get_weights().items():
            np.testing.assert_array_equal(client.policy.get_weights()[name].numpy(), value.numpy())
    finally:
        source.stop()


def torch_no_grad():
    import torch

    return torch.no_grad()


def test_client_checks_observations_before_sending(server):
    client = PolicyClient(server.address, server.token)
    episode = client.start_episode()
    with pytest.raises(ValueError, match="shape"):
        client.get_action(episode, np.zeros(3))
    with pytest.raises(ValueError, match="no action yet"):
        client.log_returns(episode, 1.0)
    # A float64 observation is converted to the space's float32.
    assert client.get_action(episode, np.zeros(2, np.float64)) in (0, 1, 2)
    with pytest.raises(PolicyServerError) as e:
        client.get_action(episode + 1, np.zeros(2))
    assert e.value.status == 404 and "unknown episode_id" in e.value.reason


def test_a_wrong_token_is_refused_at_connect(server):
    with pytest.raises(PolicyServerError) as e:
        PolicyClient(server.address, "wrong")
    assert e.value.status == 401


# ---- many client processes, and learning -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_clients(source, tmp_path, n, *extra):
    token_file = tmp_path / "token"
    token_file.write_text(source.token)
    os.chmod(token_file, 0o600)
    return [subprocess.Popen([sys.executable, str(CLIENT), "--address", source.address, "--token-file",
                              str(token_file), "--seed", str(i), "--max-seconds", "240", *extra],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT) for i in range(n)]


def finish_clients(procs):
    summaries = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    return summaries


def test_eight_client_processes_at_once_episodes_interleaved(tmp_path):
    source, workers, _ = make_server(env="CartPole-v1", num_envs_per_worker=1, rollout_fragment_length=256)
    plan = Plan(workers.input_source.stream(workers))
    with plan:
        source.start(workers)
        procs = start_clients(source, tmp_path, 8, "--max-steps", "1000")
        batches = [plan.step()["output"] for _ in range(28)]  # 7,168 of the 8,000 steps
    summaries = finish_clients(procs)
    assert all(s["steps"] > 0 for s in summaries)
    assert all(s["stopped"] in ("server gone", "max_steps") for s in summaries)
    for batch in batches:
        eps = batch["eps_id"]
        starts = np.flatnonzero(np.r_[True, eps[1:] != eps[:-1]])
        assert len(np.unique(eps)) == len(starts)  # each episode's rows together
        t = batch["t"]
        assert np.all(np.diff(t)[np.diff(eps) == 0] == 1)  # in time order
    # Episodes of the 8 clients ran side by side: most batches hold rows of several of them.
    assert np.mean([len(np.unique(b["eps_id"])) >= 4 for b in batches]) > 0.5
    assert sum(len(b.episodes) for b in batches) > 100


def test_ppo_trained_only_through_four_external_client_processes(tmp_path):
    """PPO on CartPole-v1 with examples/ppo_cartpole.yaml's settings, every step taken by one of
    four client processes (each its own env) over loopback: a mean return of 475 over the last
    100 episodes within 100k env steps."""
    source, workers, cfg = make_server(env="CartPole-v1", lr=0.001)
    plan = build_ppo_plan(workers, cfg)
    results = []
    with plan:
        source.start(workers)
        procs = start_clients(source, tmp_path, 4)
        for result in plan.run(max_iterations=49):  # 49 x 2048 = 100,352 env steps
            results.append(result)
            if (result["episode_return_mean"] or 0) >= 475:
                break
    finish_clients(procs)
    last = results[-1]
    assert last["episode_return_mean"] >= 475, (last["timesteps_total"], last["episode_return_mean"])
    assert last["num_abandoned_episodes"] == 0 and last["num_rejected_requests"] == 0
    assert results[0]["external_address"] == source.address


def test_dqn_trained_only_through_four_epsilon_greedy_clients_that_log_their_random_actions(tmp_path):
    """DQN on CartPole-v1 with examples/dqn_cartpole_external.yaml's settings, where 4 client
    processes explore: with probability epsilon (1 -> 0.02 over each client's first 2,000 steps)
    a client picks a random action and logs it (log_action), else it asks the server's greedy
    policy (get_action). The training episode_return_mean (the clients' last 100 episodes,
    exploration included) reaches 475 within the example's stop, 200k env steps: in 20 of 20
    runs at 70.6k-142.3k (the example's header gives them, and the settings that missed)."""
    from flowrl.planfile import load_yaml

    spec = load_yaml((ROOT / "examples" / "dqn_cartpole_external.yaml").read_text())["cartpole-dqn-external"]
    # The example's whole config, input: external and its server settings too, on a free port.
    config = dict(spec["config"], external={**spec["config"]["external"], "port": 0})
    source, workers, cfg = make_server(DQNConfig, env=spec["env"], **config)
    plan = build_dqn_plan(workers, cfg)
    with plan:
        source.start(workers)
        procs = start_clients(source, tmp_path, 4, "--epsilon-greedy", "2000", "--final-epsilon", "0.02",
                              "--max-seconds", "900")
        for result in plan.run(max_iterations=200):  # timesteps_per_iteration 1000: ~200k env steps
            if (result["episode_return_mean"] or 0) >= 475:
                break
    finish_clients(procs)
    assert result["episode_return_mean"] >= 475, (result["timesteps_total"], result["episode_return_mean"])
    assert result["num_rejected_requests"] == 0 and result["num_abandoned_episodes"] == 0


def test_flowrl_run_serves_clients_and_prints_the_address_in_the_first_progress_line(tmp_path):
    port = free_port()
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"ext:\n  env: CartPole-v1\n  run: PPO\n  stop: {{timesteps_total: 512}}\n"
                         f"  config: {{train_batch_size: 256, sgd_minibatch_size: 64, num_sgd_iter: 1, input: external,"
                         f" external: {{port: {port}}}}}\n")
    run = subprocess.Popen([sys.executable, "-m", "flowrl.cli", "run", str(plan_file), "--output-dir",
                            str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=ROOT)
    token_file = tmp_path / "runs" / "ext" / "latest" / "external_token"
    client = subprocess.run([sys.executable, str(CLIENT), "--address", f"http://127.0.0.1:{port}", "--token-file",
                             str(token_file), "--max-steps", "5000", "--max-seconds", "120"],
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    address = f"http://127.0.0.1:{port}"
    printed = re.search(f"flowrl: serving external clients at {address}; token in (\\S+)", err)
    assert printed and Path(printed.group(1)).resolve() == token_file.resolve()
    first = out.splitlines()[0]
    assert first.startswith("ext | iter     1 |") and first.endswith(f"| serving clients at {address}")
    assert "serving clients" not in out.splitlines()[1]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    summary = json.loads(client.stdout.strip().splitlines()[-1])
    assert summary["stopped"] == "server gone" and summary["steps"] >= 512
