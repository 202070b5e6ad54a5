"""Multi-agent recordings (`output:` with `multiagent`): one dataset per policy with string
agent_id and policy_id columns and that policy's spaces; offline plans train from one policy's
rows (`input_policy_id`); `flowrl dataset inspect` shows each policy's rows."""

import json

import gymnasium as gym
import numpy as np
import pyarrow.parquet as pq
import pytest

import flowrl
from flowrl import SampleBatch
from flowrl.cli import main
from flowrl.config import ConfigError
from flowrl.connectors import Dataset, DatasetError, MultiAgentDatasetWriter, open_policy
from flowrl.connectors.inspect import inspect_path
from flowrl.connectors.reader import EpisodeReturns
from flowrl.multi_agent_batch import MultiAgentBatch

CARTPOLE = "flowrl.testing_envs:multi_agent_cartpole"
SCRIPTED = "flowrl.testing_envs:ScriptedMultiAgentEnv"
COLUMNS = ["eps_id", "obs", "actions", "rewards", "new_obs", "terminateds", "truncateds", "action_logp", "t",
           "agent_id", "policy_id"]


def record(path, env, iterations=2, **config):
    """A short independent-policy PPO run that records to `path`; its last result."""
    algo = flowrl.build("PPO", env=env, config={
        "multiagent": {"policy_mapping": "independent"}, "output": str(path), "seed": 0,
        "rollout_fragment_length": 50, "train_batch_size": 100, "sgd_minibatch_size": 50, "num_sgd_iter": 1,
        **config})
    try:
        for _ in range(iterations):
            result = algo.train()
    finally:
        algo.stop()
    return result


@pytest.fixture(scope="module")
def cartpole_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ma") / "cartpole"
    return path, record(path, CARTPOLE, env_config={"num_agents": 2})


def test_each_policy_is_recorded_with_agent_and_policy_ids_and_counts_match_the_run(cartpole_dataset):
    path, result = cartpole_dataset
    manifest = json.loads((path / "_multiagent.json").read_text())
    assert manifest == {"format": "flowrl.multiagent", "policies": ["agent_0", "agent_1"]}
    rows = {}
    for pid in manifest["policies"]:
        table = pq.read_table(path / pid)  # plain pyarrow
        assert table.column_names == COLUMNS
        assert str(table.schema.field("agent_id").type) == str(table.schema.field("policy_id").type) == "string"
        assert set(table.column("policy_id").to_pylist()) == set(table.column("agent_id").to_pylist()) == {pid}
        # t counts the agent's own steps: each (eps_id, t) once, consecutive within an episode.
        eps, t = table.column("eps_id").to_numpy(), table.column("t").to_numpy()
        order = np.lexsort((t, eps))
        same = eps[order][1:] == eps[order][:-1]
        assert np.all(t[order][1:][same] == t[order][:-1][same] + 1)
        rows[pid] = table.num_rows
    assert sum(rows.values()) == result["num_agent_steps_sampled"]
    # Every env step of 2 CartPoles steps each pole still up: both policies have rows, at most one per env step.
    assert all(0 < n <= result["num_env_steps_sampled"] for n in rows.values())
    assert pq.read_table(path).num_rows == result["num_agent_steps_sampled"]  # equal spaces: readable at once


def test_inspect_shows_rows_per_policy(cartpole_dataset, capsys):
    path, result = cartpole_dataset
    info = inspect_path(str(path))
    assert info["format"] == "multi-agent" and info["rows"] == result["num_agent_steps_sampled"]
    for pid, policy in info["policies"].items():
        assert policy["agents"] == {pid: policy["rows"]}
        assert policy["spaces"]["obs"].startswith("Box(")
    assert main(["dataset", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: multi-agent, 2 policies, {result['num_agent_steps_sampled']:,} rows "
                          "(episodes: each agent's trajectory)")
    for pid, policy in info["policies"].items():
        assert f"policy {pid}: {policy['rows']:,} rows" in out
        assert f"agents: {pid} {policy['rows']:,} rows" in out


def test_bc_trains_from_the_rows_of_one_policy(cartpole_dataset):
    path, _ = cartpole_dataset
    wanted = Dataset.open(path / "agent_1").num_rows
    algo = flowrl.build("BC", config={"input": str(path), "input_policy_id": "agent_1", "input_num_epochs": 1,
                                      "train_batch_size": 10_000, "evaluation_interval": 0, "seed": 0})
    try:
        result = algo.train()  # one pass over the dataset in one batch
    finally:
        algo.stop()
    assert result["num_rows_read"] == wanted < pq.read_table(path).num_rows
    assert abs(result["policy_loss"] - np.log(2)) < 1e-3  # -log pi(a|s) of a new policy: about uniform on 2


@pytest.mark.parametrize("policy_id, message", [
    (None, "input_policy_id: missing: {path} is a multi-agent dataset; choose the policy to train from: "
           "agent_0, agent_1"),
    ("agent_7", "input_policy_id: 'agent_7' is not a policy of {path} (it has: agent_0, agent_1)"),
])
def test_a_multi_agent_dataset_needs_a_known_policy_id_in_one_line(cartpole_dataset, tmp_path, capsys,
                                                                    policy_id, message):
    path, _ = cartpole_dataset
    with pytest.raises(ConfigError) as e:
        open_policy(str(path), policy_id)
    assert str(e.value) == message.format(path=path)
    plan = tmp_path / "bc.yaml"
    extra = "" if policy_id is None else f", input_policy_id: {policy_id}"
    plan.write_text(f"bc:\n  run: BC\n  stop: {{training_iteration: 1}}\n  config: {{input: {path}{extra}}}\n")
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"config.{message.format(path=path)}" in err


def test_policy_id_for_a_single_agent_dataset_and_opening_the_whole_recording_are_errors(cartpole_dataset):
    path, _ = cartpole_dataset
    with pytest.raises(ConfigError, match=r"^input_policy_id: 'agent_0' given, but the input is not a multi-agent "
                                          r"dataset \(no _multiagent.json\)$"):
        open_policy(str(path / "agent_0"), "agent_0")
    with pytest.raises(DatasetError, match=r"a multi-agent dataset; read one policy's rows \(input_policy_id: "
                                           r"one of agent_0, agent_1\)$"):
        Dataset.open(path)


def test_policies_with_different_spaces_keep_their_own_spaces_and_bc_builds_the_right_policy(tmp_path):
    path = tmp_path / "scripted"
    result = record(path, SCRIPTED, iterations=1, rollout_fragment_length=4, train_batch_size=8,
                    sgd_minibatch_size=8)
    env = flowrl.testing_envs.ScriptedMultiAgentEnv()
    rows = {}
    for pid in ("walker", "flyer", "late"):
        data = Dataset.open(path / pid)
        assert data.spaces["obs"] == env.observation_space(pid) and data.spaces["actions"] == env.action_space(pid)
        rows[pid] = data.num_rows
    # Per 4-step episode the walker acts 4 times, the flyer and the late agent 2 times each.
    episodes = result["num_env_steps_sampled"] // 4
    assert rows == {"walker": 4 * episodes, "flyer": 2 * episodes, "late": 2 * episodes}
    algo = flowrl.build("BC", config={"input": str(path), "input_policy_id": "flyer", "train_batch_size": 4,
                                      "evaluation_interval": 0, "seed": 0})
    try:
        algo.train()
        policy = algo.workers.policy
        assert policy.observation_space == gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        assert policy.action_space == gym.spaces.Box(-1, 1, (2,), np.float32)
    finally:
        algo.stop()


def test_agents_sharing_a_policy_are_read_as_one_trajectory_each_by_hand(tmp_path):
    """Two agents of one shared policy in episode 5, t counting each agent's steps: MARWIL's
    returns-to-go see two trajectories, not one episode with each step twice."""
    rows = SampleBatch({"eps_id": np.array([5, 5, 5, 5, 9]), "t": np.array([0, 1, 0, 1, 0]),
                        "agent_id": np.array([1, 1, 0, 0, 0]), "rewards": np.array([1, 2, 10, 20, 7], np.float32),
                        "terminateds": np.array([False, True, False, True, True])})
    with MultiAgentDatasetWriter(tmp_path, agent_names=["red", "blue"]) as writer:
        writer.write(MultiAgentBatch({"shared": rows}, env_steps=3))
    data = open_policy(str(tmp_path), "shared")
    assert data.agents == ["blue", "red"]
    # Dense ids in (agent, eps_id) order: blue's episode 5 -> 0, red's 5 -> 1, red's 9 -> 2.
    assert np.concatenate([c["eps_id"] for c in data.scan(["eps_id"])]).tolist() == [0, 0, 1, 1, 2]
    returns = EpisodeReturns.from_dataset(data, gamma=0.5)
    # blue (index 1) in 5: R_0 = 1 + 0.5 * 2 = 2, R_1 = 2; red in 5: 10 + 0.5 * 20 = 20, 20; red in 9: 7.
    assert returns.lookup(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 0, 1, 0])).tolist() == [2, 2, 20, 20, 7]
    assert inspect_path(str(tmp_path))["policies"]["shared"]["episodes"]["total"] == 3


def test_marwil_with_estimates_trains_from_a_shared_policy_recording(tmp_path):
    path = tmp_path / "shared"
    result = record(path, CARTPOLE, iterations=1, env_config={"num_agents": 2},
                    multiagent={"policy_mapping": "shared"})
    data = open_policy(str(path), "shared")
    assert data.num_rows == result["num_agent_steps_sampled"] and data.agents == ["agent_0", "agent_1"]
    algo = flowrl.build("MARWIL", config={"input": str(path), "input_policy_id": "shared", "train_batch_size": 64,
                                          "evaluation_interval": 0, "off_policy_estimation_interval": 1,
                                          "seed": 0})
    try:
        result = algo.train()
    finally:
        algo.stop()
    assert np.isfinite(result["vf_loss"]) and result["num_rows_read"] == 64
    assert np.isfinite(result["off_policy_estimation"]["wis/v_target"])
