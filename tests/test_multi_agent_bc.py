"""BC and MARWIL run multi-agent: with `multiagent` and a multi-agent recording as `input`, each
policy to train learns from its own rows (policy_id), with its own optimizer and MARWIL scale,
and is evaluated greedily with the team acting."""

import numpy as np
import pyarrow.parquet as pq
import pytest

import flowrl
from flowrl.cli import main
from flowrl.connectors import DatasetError, MultiAgentDatasetWriter
from flowrl.multi_agent_batch import MultiAgentBatch
from flowrl.sample_batch import SampleBatch
from flowrl.testing_envs import MultiAgentCartPole

CARTPOLE = "flowrl.testing_envs:multi_agent_cartpole"
AGENTS = ["agent_0", "agent_1"]
INDEPENDENT = {"policy_mapping": "independent"}


def balance(obs: np.ndarray) -> int:
    """A scripted CartPole expert: push towards where the pole leans, looking ahead."""
    return int(obs[2] + 0.5 * obs[3] > 0)


def always_left(obs: np.ndarray) -> int:
    return 0


EXPERTS = {"agent_0": balance, "agent_1": always_left}  # unlike policies: each must learn its own rows


def record(path, episodes: int, max_steps: int = 200) -> dict[str, int]:
    """`episodes` episodes of the 2-agent CartPole with EXPERTS acting, written as `output:`
    writes a multi-agent run; the rows per policy."""
    env = MultiAgentCartPole(num_agents=2, max_episode_steps=max_steps)
    rows = {a: [] for a in AGENTS}
    for eps_id in range(episodes):
        obs, _ = env.reset(seed=eps_id)
        t = dict.fromkeys(AGENTS, 0)
        while env.agents:
            actions = {a: EXPERTS[a](obs[a]) for a in env.agents}
            new_obs, rewards, terminated, truncated, _ = env.step(actions)
            for a in actions:
                rows[a].append((eps_id, t[a], obs[a], actions[a], rewards[a], new_obs[a], terminated[a],
                                truncated[a] and not terminated[a], AGENTS.index(a)))
                t[a] += 1
            obs = new_obs
    names = ["eps_id", "t", "obs", "actions", "rewards", "new_obs", "terminateds", "truncateds", "agent_id"]
    batches = {a: SampleBatch({k: np.array([r[i] for r in rows[a]]) for i, k in enumerate(names)}) for a in AGENTS}
    with MultiAgentDatasetWriter(path, agent_names=AGENTS) as writer:
        writer.write(MultiAgentBatch(batches, env_steps=max(len(b) for b in batches.values())))
    return {a: len(b) for a, b in batches.items()}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    path = tmp_path_factory.mktemp("ma_bc") / "experts"
    return path, record(path, episodes=10)


def build(plan, path, **config):
    return flowrl.build(plan, env=CARTPOLE, config={
        "input": str(path), "multiagent": INDEPENDENT, "env_config": {"num_agents": 2}, "seed": 0,
        "train_batch_size": 256, "lr": 1e-2, "evaluation_interval": 0, **config})


def greedy_agreement(policy, path) -> float:
    """How often the policy's greedy action is the recorded one, over its policy's rows at `path`."""
    table = pq.read_table(path)
    obs = np.stack(table.column("obs").to_numpy(zero_copy_only=False)).astype(np.float32)
    return float(np.mean(policy.compute_actions(obs, explore=False).actions == table.column("actions").to_numpy()))


@pytest.mark.parametrize("seed", [0, 1])
def test_bc_trains_each_policy_from_its_own_rows_and_each_imitates_its_expert(experts, seed):
    path, rows = experts
    algo = build("BC", path, seed=seed, evaluation_interval=59, evaluation_num_episodes=3)  # at iterations 1, 60
    try:
        for _ in range(60):
            result = algo.train()
        policies = algo.workers.policies
        agreement = {pid: greedy_agreement(policies[pid], path / pid) for pid in AGENTS}
    finally:
        algo.stop()
    # Each policy read train_batch_size of its own rows per step and trained on them.
    assert result["num_rows_read"] == result["num_agent_steps_sampled"] == result["num_agent_steps_trained"] \
        == 60 * 2 * 256
    assert result["num_env_steps_sampled"] == 60 * 256  # a batch covers its largest policy batch's steps
    # -log pi(a|s), a new policy's log 2 = 0.69 at first: measured 0.24-0.31 (balance, whose
    # recorded states sit near its switching line) and < 0.01 (always_left) on seeds 0-2.
    assert result["policy/agent_0/policy_loss"] < 0.45 and result["policy/agent_1/policy_loss"] < 0.05
    # The recorded action, greedy, on the policy's own rows: measured 0.89-0.92 and 1.0.
    assert agreement["agent_0"] > 0.8 and agreement["agent_1"] > 0.98
    # The expert keeps its pole up for all 200 recorded steps; its clone, greedy, for the 500 of
    # CartPole-v1 (measured 500 on seeds 0-2); always-left falls in 9-10 steps (measured 9.3).
    assert result["policy/agent_0/evaluation/episode_return_mean"] > 400
    assert result["policy/agent_1/evaluation/episode_return_mean"] < 15


def test_marwil_keeps_a_scale_per_policy_and_returns_to_go_per_agent(experts):
    path, _ = experts
    algo = build("MARWIL", path, beta=1.0, train_batch_size=64)
    try:
        result = algo.train()
        state = algo.plan.state
    finally:
        algo.stop()
    # c^2 <- c^2 + 0.01 (mean A^2 - c^2) from 100, once per policy: each moved on its own advantages.
    assert sorted(state) == ["policy/agent_0/sqd_adv_norm", "policy/agent_1/sqd_adv_norm"]
    assert state["policy/agent_0/sqd_adv_norm"] != state["policy/agent_1/sqd_adv_norm"]
    for pid in AGENTS:
        assert np.isfinite(result[f"policy/{pid}/vf_loss"])
    assert "off_policy_estimation" not in result  # IS/WIS are single-agent only


def test_a_dataset_policy_the_config_does_not_name_is_one_line_exit_2(experts, tmp_path, capsys):
    path, _ = experts
    plan = tmp_path / "bc.yaml"
    plan.write_text(f"bc:\n  env: {CARTPOLE}\n  run: BC\n  stop: {{training_iteration: 1}}\n"
                    f"  config:\n    input: {path}\n    env_config: {{num_agents: 1}}\n"
                    f"    multiagent: {{policy_mapping: independent}}\n")
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith(f"config.input: {path}: column 'policy_id': 'agent_1' is not a policy of config.multiagent "
                        "(its policies: agent_0)")


def test_a_policy_to_train_without_rows_and_other_bad_settings_are_one_line(experts, tmp_path):
    path, _ = experts
    with MultiAgentDatasetWriter(tmp_path / "one", agent_names=AGENTS) as writer:
        writer.write(MultiAgentBatch({"agent_0": SampleBatch({"obs": np.zeros((3, 4), np.float32),
                                                              "actions": np.zeros(3, np.int64),
                                                              "agent_id": np.zeros(3, np.int64)})}, env_steps=3))
    with pytest.raises(flowrl.ExperimentError, match=r"config.input: .*one: column 'policy_id': no rows of 'agent_1', "
                                                     r"a policy to train \(the dataset has: agent_0\)$"):
        build("BC", tmp_path / "one")
    with pytest.raises(flowrl.ExperimentError, match=r"config.input_policy_id: with multiagent each policy"):
        build("BC", path, input_policy_id="agent_0")
    with pytest.raises(flowrl.ExperimentError, match=r"config.input_fraction: must be 1 with multiagent"):
        build("MARWIL", path, input_fraction=0.5)
    with pytest.raises(flowrl.ExperimentError, match=r"config.input: .*agent_0 is not a multi-agent dataset"):
        build("BC", path / "agent_0")
    with pytest.raises(flowrl.ExperimentError, match=r"config.multiagent: an offline plan takes its policies' agents "
                                                     r"and spaces from the env: name it \(env: ...\)$"):
        flowrl.build("BC", config={"input": str(path), "multiagent": INDEPENDENT})
    with pytest.raises(DatasetError):
        flowrl.connectors.Dataset.open(path)  # the whole recording is no single-agent dataset


def test_a_frozen_policy_reads_no_rows_and_keeps_its_weights(experts):
    path, _ = experts
    algo = build("BC", path, multiagent={**INDEPENDENT, "policies_to_train": ["agent_0"]}, train_batch_size=32)
    try:
        frozen = {k: v.clone() for k, v in algo.workers.policies["agent_1"].model.state_dict().items()}
        result = algo.train()
        after = algo.workers.policies["agent_1"].model.state_dict()
    finally:
        algo.stop()
    assert result["num_rows_read"] == 32 and "policy/agent_1/policy_loss" not in result
    assert all((after[k] == v).all() for k, v in frozen.items())


def test_the_loss_moves_only_the_scale_of_the_policy_it_trains_by_hand():
    from flowrl.plans.marwil import MARWILConfig, marwil_loss
    from tests.test_losses import marwil_policy

    policy, batch = marwil_policy()  # A = R - V = [1, -1]: mean A^2 = 1
    state = {"policy/a/sqd_adv_norm": 100.0, "policy/b/sqd_adv_norm": 4.0}
    marwil_loss(policy, batch, MARWILConfig(input="unused", beta=1.0), state, "policy/b/sqd_adv_norm")
    # c_b^2 = 4 + 0.01 (1 - 4) = 3.97; a's is not touched.
    assert state == {"policy/a/sqd_adv_norm": 100.0, "policy/b/sqd_adv_norm": pytest.approx(3.97)}
