"""Multi-agent DQN (and SAC): per-policy replay (rows kept apart, n-step returns per agent worked out by hand,
priorities per policy, buffer checkpoints), target networks and epsilon per policy, greedy
evaluation per policy, learning on a two-pole CartPole, checkpoint and restore, plan files."""

import numpy as np
import pytest

import flowrl
from flowrl.multi_agent_batch import MultiAgentBatch
from flowrl.operators import Concurrently, UpdateTargetNetwork
from flowrl.operators.replay import Replay, ReplayBuffer, StoreToReplayBuffer, UpdatePriorities
from flowrl.plan import Plan
from flowrl.plans.off_policy import ExplorationSchedule
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.stream import Stream

CARTPOLE = "flowrl.testing_envs:multi_agent_cartpole"
INDEPENDENT = {"multiagent": {"policy_mapping": "independent"}, "env_config": {"num_agents": 2}}


def rows(obs, rewards, agent_id, eps_id=7, t=None, terminated_last=False):
    """One policy's rows: obs as given (one number each), new_obs = obs + 1."""
    n = len(obs)
    terminateds = np.zeros(n, bool)
    terminateds[-1] = terminated_last
    obs = np.asarray(obs, np.float32)[:, None]
    return SampleBatch({"obs": obs, "new_obs": obs + 1,
                        "actions": np.zeros(n, np.int64), "rewards": np.asarray(rewards, np.float32),
                        "terminateds": terminateds, "truncateds": np.zeros(n, bool),
                        "eps_id": np.full(n, eps_id, np.int64), "t": np.arange(n) if t is None else np.asarray(t),
                        "agent_id": np.full(n, agent_id, np.int64)})


def by_obs(buffer):
    stored = buffer.get(np.arange(len(buffer)))
    order = np.argsort(stored["obs"][:, 0])
    return {k: stored[k][order].reshape(-1).tolist() for k in ("obs", "rewards", "new_obs", "discounts")}


# ---- per-policy replay --------------------------------------------------------------------------------
def test_each_policy_has_its_own_buffer_and_agents_of_one_policy_their_own_n_step_sums():
    buf = ReplayBuffer(capacity=10, n_step=2, gamma=0.5, seed=0)
    # "shared": agents 0 and 1 of the same episode (eps_id 7), rows laid out agent by agent, as
    # the multi-agent worker lays them out; "solo": one agent, rewards 100, 200.
    shared = SampleBatch.concat([rows([0, 1, 2], [1, 2, 4], agent_id=0), rows([10, 11, 12], [8, 16, 32], agent_id=1)])
    solo = rows([50, 51], [100, 200], agent_id=2, terminated_last=True)
    stored = buf.add(MultiAgentBatch({"shared": shared, "solo": solo}, env_steps=3))
    # 2-step sums r_t + 0.5 r_{t+1} within each agent; the last row of each agent waits for its next step.
    assert stored == 4 + 2
    assert sorted(buf.policy_buffers) == ["shared", "solo"] and len(buf) == 0
    assert by_obs(buf.policy_buffer("shared")) == {"obs": [0, 1, 10, 11], "rewards": [2, 4, 16, 32],
                                                   "new_obs": [2, 3, 12, 13], "discounts": [0.25] * 4}
    assert by_obs(buf.policy_buffer("solo")) == {"obs": [50, 51], "rewards": [200, 200], "new_obs": [52, 52],
                                                 "discounts": [0.25, 0.5]}
    # The next fragment: each agent's pending row completes with its own next step.
    buf.add(MultiAgentBatch({"shared": SampleBatch.concat([rows([3], [64], 0, t=[3]), rows([13], [128], 1, t=[3])])},
                            env_steps=1))
    got = by_obs(buf.policy_buffer("shared"))
    assert (got["obs"][2], got["rewards"][2], got["obs"][5], got["rewards"][5]) == (2, 4 + 32, 12, 32 + 64)


def test_replay_yields_a_minibatch_per_policy_past_learning_starts_and_priorities_go_to_each():
    buf = ReplayBuffer(capacity=20, prioritized=True, alpha=1.0, eps=0.5, seed=0)

    def batches():
        for i in range(100):  # "big" gets 4 rows a step, "small" 1: it reaches learning_starts later
            yield MultiAgentBatch({"big": rows(np.arange(4) + 10 * i, np.ones(4), 0),
                                   "small": rows([1000 + i], [1.0], 1)}, env_steps=1)

    store = Stream.source(batches).then(StoreToReplayBuffer(buf))
    with Plan(Concurrently({"store": store, "train": Replay(buf, batch_size=3, learning_starts=8)},
                           output="train")) as plan:
        first = plan.step()
        replayed = [plan.step()["output"] for _ in range(8)]
    assert isinstance(first["output"], MultiAgentBatch) and list(first["output"].policy_batches) == ["big"]
    assert first["policy/big/replay_buffer_size"] == 8 and first["policy/small/replay_buffer_size"] == 2
    assert first["replay_buffer_size"] == 10
    last = replayed[-1]
    assert sorted(last.policy_batches) == ["big", "small"] and last.env_steps == 3
    assert all(len(b) == 3 for b in last.policy_batches.values())
    assert (last["small"]["obs"] >= 1000).all() and (last["big"]["obs"] < 1000).all()  # rows never mix
    # Priorities: policy/<name>/td_error and batch_indexes set that policy's buffer only.
    small_before = buf.policy_buffer("small").priorities
    stats = UpdatePriorities(buf)({"policy/big/loss": 1.0, "policy/big/td_error": np.array([3.5]),
                                   "policy/big/batch_indexes": np.array([2]), "learn_time_s": 0.1})
    assert stats == {"policy/big/loss": 1.0, "learn_time_s": 0.1}
    assert buf.policy_buffer("big").priorities[2] == 4.0  # |3.5| + 0.5, alpha 1
    assert (buf.policy_buffer("small").priorities == small_before).all()
    with pytest.raises(KeyError, match="policy/small/td_error"):
        UpdatePriorities(buf)({"policy/small/loss": 1.0})


def test_a_batch_of_some_policies_stores_only_those():
    buf = ReplayBuffer(capacity=10)
    batch = MultiAgentBatch({"dqn": rows([1, 2], [1, 1], 0), "ppo": rows([3], [1], 1)}, env_steps=2)
    StoreToReplayBuffer(buf)(batch.select_policies(["dqn"]))
    assert list(buf.policy_buffers) == ["dqn"] and len(buf.policy_buffer("dqn")) == 2


def test_buffer_state_holds_every_policy_and_restores_it(tmp_path):
    buf = ReplayBuffer(capacity=10, n_step=2, gamma=0.5, prioritized=True, seed=3)
    buf.add(MultiAgentBatch({"a b": rows([0, 1, 2], [1, 2, 4], 0), "c": rows([5, 6], [1, 1], 1)}, env_steps=3))
    buf.policy_buffer("c").update_priorities(np.array([0]), np.array([2.0]))
    buf.save(tmp_path / "replay.npz")
    again = ReplayBuffer(capacity=10, n_step=2, gamma=0.5, prioritized=True, seed=99)
    again.load(tmp_path / "replay.npz")
    assert list(again.policy_buffers) == ["a b", "c"]
    for pid in ("a b", "c"):
        mine, theirs = buf.policy_buffer(pid), again.policy_buffer(pid)
        assert (len(theirs), theirs.num_pending) == (len(mine), mine.num_pending) == (len(mine), 1)
        assert (theirs.priorities == mine.priorities).all()
        assert (theirs.sample(5)["obs"] == mine.sample(5)["obs"]).all()  # the sampling generator too
    # The pending row of agent 0 completes after the restore as it would have before.
    again.add(MultiAgentBatch({"a b": rows([3], [8], 0, t=[3])}, env_steps=1))
    assert by_obs(again.policy_buffer("a b"))["rewards"][2] == 4 + 0.5 * 8


def test_a_restored_buffer_schedules_beta_on_agent_steps_before_anything_new_is_stored(tmp_path):
    # After a resume Replay samples the restored rows at once; beta must follow the agent steps the
    # stored batches counted, not the env steps (the fresh buffer's default until a store).
    buf = ReplayBuffer(capacity=10, prioritized=True, alpha=1.0, seed=0)
    buf.add(MultiAgentBatch({"p": rows([0, 1], [1, 1], 0)}, env_steps=2, count_steps_by="agent_steps"))
    buf.policy_buffer("p").update_priorities(np.array([0, 1]), np.array([1.0, 3.0]))   # p = |td| + 1e-6
    buf.save(tmp_path / "replay.npz")
    again = ReplayBuffer(capacity=10, prioritized=True, alpha=1.0, seed=0)
    again.load(tmp_path / "replay.npz")
    assert again.count_steps_by == "agent_steps"
    replay = Replay(again, batch_size=8, beta_schedule=[[0, 0.0], [1000, 1.0]])
    with Plan(replay) as plan:
        plan.ctx.counters["num_env_steps_sampled"] = 1000   # beta 1.0 if it followed env steps
        plan.ctx.counters["num_agent_steps_sampled"] = 500  # beta 0.5
        sampled = plan.step()["output"]["p"]
    # w = (p_i / p_min)^-beta: 1 for the first row, (3 / 1)^-0.5 for the second.
    ratio = (3.0 + 1e-6) / (1.0 + 1e-6)
    expected = np.where(sampled["batch_indexes"] == 0, 1.0, ratio ** -0.5)
    assert set(sampled["batch_indexes"].tolist()) == {0, 1}
    assert np.allclose(sampled["weights"], expected)


# ---- target networks, exploration, evaluation --------------------------------------------------------
def test_target_networks_of_the_policies_to_train_follow_their_own_trained_rows():
    workers = WorkerSet(env=CARTPOLE, env_config={"num_agents": 3}, seed=0, policy="QPolicy",
                        count_steps_by="agent_steps",
                        multiagent={"policy_mapping": "independent", "policies_to_train": ["agent_0", "agent_1"]})
    op = UpdateTargetNetwork(workers, every_steps=100)
    with Plan(Stream.from_iterable(range(3)).then(op)) as plan:
        policies = workers.policies
        for p in policies.values():
            for param in p.model.parameters():
                param.data.add_(1.0)  # the online networks move away from their targets
        plan.ctx.counters["num_env_steps_trained"] = 50   # not what the schedules follow
        plan.ctx.counters["num_agent_steps_trained"] = 250
        plan.ctx.counters["policy/agent_0/num_agent_steps_trained"] = 150
        plan.ctx.counters["policy/agent_1/num_agent_steps_trained"] = 100
        result = plan.step()
    assert result["num_target_updates"] == 2 and result["last_target_update_step"] == 250
    assert result["policy/agent_0/last_target_update_step"] == 150
    assert result["policy/agent_1/last_target_update_step"] == 100
    for pid in ("agent_0", "agent_1"):
        assert result[f"policy/{pid}/num_target_updates"] == 1
        model, target = policies[pid].model.state_dict(), policies[pid].target_model.state_dict()
        assert all(torch_equal(model[k], target[k]) for k in model)
    assert policies["agent_2"].target_model is None  # frozen: no target network


def torch_equal(a, b):
    return bool((a == b).all())


@pytest.mark.parametrize("count_steps_by, steps, expected", [("env_steps", 500, 0.5), ("agent_steps", 250, 0.75)])
def test_exploration_schedule_sets_every_q_policy_on_the_counted_steps(count_steps_by, steps, expected):
    workers = WorkerSet(env=CARTPOLE, env_config={"num_agents": 2}, seed=0, policy="QPolicy",
                        count_steps_by=count_steps_by,
                        multiagent={"policy_mapping": "independent", "policies_to_train": ["agent_0"]})
    with Plan(Stream.from_iterable(range(3)).then(ExplorationSchedule(workers, [[0, 1.0], [1000, 0.0]]))) as plan:
        plan.ctx.counters["num_env_steps_sampled"] = 500
        plan.ctx.counters["num_agent_steps_sampled"] = 250
        result = plan.step()
    assert result["epsilon"] == expected
    assert [p.epsilon for p in workers.policies.values()] == [expected, expected]  # the frozen one too


def test_greedy_evaluation_reports_the_team_and_each_policy():
    from flowrl.operators.evaluation import EvaluatePolicy

    workers = WorkerSet(env=CARTPOLE, env_config={"num_agents": 2}, seed=0, policy="QPolicy",
                        multiagent={"policy_mapping": "independent"})
    op = EvaluatePolicy(workers, CARTPOLE, {"num_agents": 2}, episodes=3)
    with Plan(Stream.from_iterable([{}]).then(op)) as plan:
        result = plan.step()
    team = result["evaluation"]
    per_policy = [result[f"policy/{p}/evaluation/episode_return_mean"] for p in ("agent_0", "agent_1")]
    assert team["episodes"] == 3 and all(r >= 8 for r in per_policy)  # a pole stands >= 8 steps
    assert team["episode_return_mean"] == pytest.approx(sum(per_policy))  # a reward of 1 per agent step
    assert result["policy/agent_0/evaluation/episodes"] == 3


# ---- the DQN plan ---------------------------------------------------------------------------------------
def test_dqn_learns_independent_policies():
    # Measured (seeds 0-5): both greedy returns >= 150 after 3k-5k env steps, ~1.5 s per 1k.
    config = {**INDEPENDENT, "seed": 0, "n_step": 3, "learning_starts": 500, "timesteps_per_iteration": 1000,
              "evaluation_interval": 1, "evaluation_num_episodes": 3}
    with flowrl.build("DQN", env=CARTPOLE, config=config) as algo:
        assert {type(p).__name__ for p in algo.workers.policies.values()} == {"QPolicy"}
        for _ in range(15):
            result = algo.train()
            greedy = [result.get(f"policy/{p}/evaluation/episode_return_mean") for p in ("agent_0", "agent_1")]
            if all(r is not None and r >= 150 for r in greedy):
                break
    assert all(r >= 150 for r in greedy), greedy
    assert result["num_target_updates"] > 0 and result["num_agent_steps_trained"] > result["num_env_steps_trained"]
    assert all(f"policy/{p}/mean_q" in result and f"policy/{p}/replay_buffer_size" in result
               for p in ("agent_0", "agent_1"))


def test_checkpoint_and_restore_continue_counters_buffers_and_targets(tmp_path):
    config = {**INDEPENDENT, "seed": 0, "learning_starts": 64, "timesteps_per_iteration": 128,
              "target_network_update_freq": 256, "checkpoint_replay_buffer": True}
    with flowrl.build("DQN", env=CARTPOLE, config=config) as algo:
        for _ in range(2):
            before = algo.train()
        path = algo.save(tmp_path / "ckpt")
        sizes = {p: len(b) for p, b in algo.plan.replay_buffer.policy_buffers.items()}
        target = {k: v.clone() for k, v in algo.workers.policies["agent_1"].target_model.state_dict().items()}
    with flowrl.restore(path) as again:
        restored = {p: len(b) for p, b in again.plan.replay_buffer.policy_buffers.items()}
        same_target = {k: v.clone() for k, v in again.workers.policies["agent_1"].target_model.state_dict().items()}
        after = again.train()
    assert restored == sizes and sizes["agent_0"] > 0
    assert all(torch_equal(target[k], same_target[k]) for k in target)
    assert after["training_iteration"] == before["training_iteration"] + 1
    assert after["num_env_steps_sampled"] >= before["num_env_steps_sampled"] + 128
    assert after["num_target_updates"] >= before["num_target_updates"] > 0
    assert after["num_agent_steps_trained"] > before["num_agent_steps_trained"] > 0


def test_a_plan_file_runs_dqn_multi_agent_and_refuses_actions_it_cannot_take(tmp_path, capsys):
    from flowrl.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
pair:
  env: {CARTPOLE}
  run: DQN
  stop: {{timesteps_total: 256}}
  config: {{multiagent: {{policy_mapping: independent}}, env_config: {{num_agents: 2}}, learning_starts: 64,
           timesteps_per_iteration: 128, seed: 0}}
""")
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 0
    capsys.readouterr()
    plan.write_text("""
mixed:
  env: flowrl.testing_envs:ScriptedMultiAgentEnv
  run: DQN
  stop: {timesteps_total: 256}
  config: {multiagent: {policy_mapping: independent}}
""")
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DQN needs Discrete actions; policy 'flyer''s agents' are Box" in err[0], err


def test_remote_workers_act_with_the_scheduled_epsilon_of_every_policy():
    # agent_1 is frozen: it never trains, yet its epsilon follows the schedule on the workers too.
    config = {"multiagent": {"policy_mapping": "independent", "policies_to_train": ["agent_0"]},
              "env_config": {"num_agents": 2}, "num_workers": 1, "seed": 0, "learning_starts": 64,
              "timesteps_per_iteration": 128, "exploration_schedule": [[0, 1.0], [1000, 0.0]]}
    with flowrl.build("DQN", env=CARTPOLE, config=config, executor="ray") as algo:
        result = algo.train()
        (remote,) = algo.workers.remote_workers.foreach("get_weights")
        local = {pid: p.epsilon for pid, p in algo.workers.policies.items()}
    assert 0 < result["epsilon"] < 1 and local == {"agent_0": result["epsilon"], "agent_1": result["epsilon"]}
    assert {pid: float(w["epsilon"]) for pid, w in remote.items()} == pytest.approx(local)
    # Its epsilon went alone: a frozen policy's weights are never resent, so its version stays 0.
    assert result["policy/agent_1/weights_version"] == 0 and "policy/agent_1/loss" not in result
    assert result["policy/agent_0/weights_version"] > 0


def test_a_shared_prioritized_policy_counts_agent_steps_per_iteration():
    config = {"multiagent": {"policy_mapping": "shared"}, "env_config": {"num_agents": 2}, "seed": 0,
              "count_steps_by": "agent_steps", "timesteps_per_iteration": 256, "learning_starts": 64,
              "prioritized_replay": True, "n_step": 2, "target_network_update_freq": 128,
              "checkpoint_replay_buffer": True}  # which makes plan.replay_buffer the buffer
    with flowrl.build("DQN", env=CARTPOLE, config=config) as algo:
        first, second = algo.train(), algo.train()
        priorities = algo.plan.replay_buffer.policy_buffer("shared").priorities
    assert second["num_agent_steps_sampled"] - first["num_agent_steps_sampled"] >= 256
    assert second["num_env_steps_sampled"] - first["num_env_steps_sampled"] < 256  # two agents a step, mostly
    assert second["num_target_updates"] >= second["num_agent_steps_trained"] // 128 - 1 > 0
    assert len(set(priorities.round(6).tolist())) > 1  # td errors set them


def test_sac_learns_a_shared_policy_on_two_pendulums():
    # Random play scores about -1,200 an episode; measured (seeds 0-2): the last 20 agent episodes
    # average -400 or better after 4k-5k env steps (each env step one minibatch of both agents' rows).
    config = {"multiagent": {"policy_mapping": "shared"}, "env_config": {"num_agents": 2}, "seed": 0, "lr": 0.001,
              "model": {"hidden": [64, 64], "activation": "relu"}, "learning_starts": 100,
              "metrics_num_episodes_for_smoothing": 20, "timesteps_per_iteration": 500}
    with flowrl.build("SAC", env="flowrl.testing_envs:multi_agent_pendulum", config=config) as algo:
        for _ in range(16):
            result = algo.train()
            if (result["policy/shared/episode_return_mean"] or -2000) >= -400:
                break
    assert result["policy/shared/episode_return_mean"] >= -400, result["policy/shared/episode_return_mean"]
    assert result["policy/shared/alpha"] < 0.5 and result["num_target_updates"] > 0
