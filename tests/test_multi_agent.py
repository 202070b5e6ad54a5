"""Multi-agent: config checks, per-agent transitions worked out by hand, per-policy operators,
PPO learning with independent and shared policies, local and Ray executors."""

import functools

import gymnasium as gym
import numpy as np
import pytest

import flowrl
from flowrl.config import ConfigError, parse_config
from flowrl.multi_agent import parse_multiagent
from flowrl.multi_agent_batch import MultiAgentBatch
from flowrl.multi_agent_env import MultiAgentEnv
from flowrl.operators import ComputeAdvantages, ConcatBatches, SelectPolicies, StandardizeFields
from flowrl.plans.ppo import PPOConfig
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch

CARTPOLE = "flowrl.testing_envs:multi_agent_cartpole"
BOX = gym.spaces.Box(-10.0, 10.0, (1,), np.float32)


class CountingEnv(MultiAgentEnv):
    """Observations: the number of env steps taken; actions: 0 or 1."""

    def observation_space(self, agent):
        return BOX

    def action_space(self, agent):
        return gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        self.n = 0
        self.agents = list(self.possible_agents)
        return self.first_observations(), {}


class SimultaneousEnv(CountingEnv):
    """Two agents that move together. "a" gets 1 per step and terminates at its 2nd step; "b"
    gets 2 per step and is truncated at its 3rd. The observation is the step count."""

    possible_agents = ["a", "b"]

    def first_observations(self):
        return {a: np.zeros(1, np.float32) for a in self.agents}

    def step(self, actions):
        assert set(actions) == set(self.agents)
        self.n += 1
        obs = {a: np.full(1, self.n, np.float32) for a in actions}
        rewards = {a: {"a": 1.0, "b": 2.0}[a] for a in actions}
        terminations = {a: a == "a" and self.n == 2 for a in actions}
        truncations = {a: a == "b" and self.n == 3 for a in actions}
        self.agents = [a for a in actions if not (terminations[a] or truncations[a])]
        return obs, rewards, terminations, truncations, {}


class TurnEnv(CountingEnv):
    """Turn-based: p0 and p1 alternate for 4 turns. The agent that moves gets 1, the other -0.5
    (a reward to an agent that did not act). Only the agent to move next is observed; at the end
    both terminate and both get their final observation (the turn count)."""

    possible_agents = ["p0", "p1"]

    def first_observations(self):
        return {"p0": np.zeros(1, np.float32)}

    def step(self, actions):
        mover = f"p{self.n % 2}"
        assert list(actions) == [mover]
        other = f"p{(self.n + 1) % 2}"
        self.n += 1
        rewards = {mover: 1.0, other: -0.5}
        obs_now = np.full(1, self.n, np.float32)
        if self.n == 4:
            self.agents = []
            done = {"p0": True, "p1": True}
            return {"p0": obs_now, "p1": obs_now}, rewards, done, {"p0": False, "p1": False}, {}
        return {other: obs_now}, rewards, {}, {}, {}


def simultaneous_env():
    return SimultaneousEnv()


def turn_env():
    return TurnEnv()


def ma_workers(env, mapping, num_envs=1, fragment=3, **kwargs):
    return WorkerSet(env=env, num_envs_per_worker=num_envs, rollout_fragment_length=fragment, seed=0,
                     multiagent={"policy_mapping": mapping, **kwargs.pop("multiagent", {})}, **kwargs)


# ---- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("section, message", [
    ({"policies": ["a"], "policy_mapping": {"x_*": "b"}}, "multiagent.policy_mapping.x_*: 'b' is not a policy"),
    ({"policies": ["a"], "policy_mapping": "shared", "policies_to_train": ["c"]},
     "multiagent.policies_to_train: 'c' is not a policy"),
    ({"policy_mapping": "clever"}, "multiagent.policy_mapping: must be a glob"),
    ({"policies": ["a", "b"], "policy_mapping": "shared"}, "multiagent.policies: shared maps every agent to one"),
    ({"policies": {"a": {"lr": -1}}, "policy_mapping": "independent"}, "multiagent.policies.a.lr: must be"),
    ({"policies": {"a": {"gamma": 0.9}}, "policy_mapping": "independent"}, "multiagent.policies.a.gamma: unknown"),
    ({"policy_mapping": "shared", "polices_to_train": []}, "multiagent.polices_to_train: unknown key; did you mean"),
    ({"policies": ["a"]}, "multiagent.policy_mapping: missing"),
])
def test_bad_multiagent_sections_name_the_key(section, message):
    with pytest.raises(ConfigError) as e:
        parse_config(PPOConfig, {"multiagent": section})
    assert str(e.value).startswith("config." + message) and "\n" not in str(e.value)


def test_count_steps_by_is_checked():
    with pytest.raises(ConfigError, match="config.count_steps_by: must be env_steps or agent_steps"):
        parse_config(PPOConfig, {"count_steps_by": "steps"})


@pytest.mark.parametrize("section, message", [
    ({"policies": ["a"], "policy_mapping": {"a*": "a"}}, "policy_mapping: agent 'b' maps to no policy"),
    ({"policies": ["a", "b", "c"], "policy_mapping": {"a": "a", "b": "b"}}, "policies: policy 'c': no agent maps"),
    ({"policies": ["a", "z"], "policy_mapping": "independent"}, "policies: policy 'z': no agent maps to it"),
])
def test_agents_and_policies_that_do_not_meet_are_errors(section, message):
    with pytest.raises(ConfigError, match="^config.multiagent." + message):
        parse_multiagent(section).resolve(SimultaneousEnv.possible_agents)


@pytest.mark.parametrize("run, config, message", [
    ("MARWIL", {"input": "unused", "input_fraction": 0.5}, "config.input_fraction: must be 1 with multiagent"),
    ("PPO", {"env_wrappers": ["normalize"]}, "config.env_wrappers: is not supported with multiagent yet"),
])
def test_what_is_not_multi_agent_yet_is_refused_in_one_line(run, config, message):
    with pytest.raises(flowrl.ExperimentError, match=message):
        flowrl.build(run, env=CARTPOLE, config={"multiagent": {"policy_mapping": "shared"}, **config})


def mapping_by_episode(agent_id, episode_id):
    return "even" if episode_id % 2 == 0 else "odd"


def test_mapping_function_gets_agent_and_episode_and_must_name_a_policy():
    setup = parse_multiagent({"policies": ["even", "odd"],
                              "policy_mapping": "tests.test_multi_agent:mapping_by_episode"}).resolve(["a"])
    assert (setup.mapping("a", 4), setup.mapping("a", 5)) == ("even", "odd")
    bad = parse_multiagent({"policies": ["even"], "policy_mapping": "tests.test_multi_agent:mapping_by_episode"})
    with pytest.raises(ConfigError, match="maps agent 'a' to 'odd', which is not a policy"):
        bad.resolve(["a"]).mapping("a", 1)


def test_a_bad_mapping_in_a_plan_file_exits_2_with_one_line(tmp_path, capsys):
    from flowrl.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_text("""
bad:
  env: tests.test_multi_agent:simultaneous_env
  run: PPO
  stop: {timesteps_total: 100}
  config: {multiagent: {policies: [a], policy_mapping: {"a*": a}}}
""")
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{plan}: experiment 'bad': config.multiagent.policy_mapping: agent 'b' maps to no policy" in err
    assert "\n" not in err


# ---- transitions worked out by hand ----------------------------------------------------------------
def test_simultaneous_agents_terminated_and_truncated_by_hand():
    workers = ma_workers("tests.test_multi_agent:simultaneous_env", "independent", fragment=3)
    batch = workers.local_worker.sample()
    assert isinstance(batch, MultiAgentBatch)
    assert (batch.env_steps, batch.agent_steps, len(batch)) == (3, 5, 3)
    assert batch.episodes == [(8.0, 3)]  # team: a 1 + 1, b 2 + 2 + 2
    assert batch.policy_episodes == {"a": [(2.0, 2)], "b": [(6.0, 3)]}
    policies = workers.policies
    a, b = batch["a"], batch["b"]
    assert a["obs"][:, 0].tolist() == [0, 1] and a["new_obs"][:, 0].tolist() == [1, 2]
    assert a["rewards"].tolist() == [1, 1] and a["terminateds"].tolist() == [False, True]
    assert a["t"].tolist() == [0, 1] and (a["agent_id"] == 0).all() and (b["agent_id"] == 1).all()
    # a terminated: no bootstrap; inside the trajectory V(new_obs) = the next row's V(obs).
    assert a["next_vf_preds"][1] == 0.0
    np.testing.assert_allclose(a["next_vf_preds"][0], a["vf_preds"][1], rtol=1e-5)
    assert b["rewards"].tolist() == [2, 2, 2] and b["truncateds"].tolist() == [False, False, True]
    assert not b["terminateds"].any()
    # b truncated: bootstraps from V(its last observation).
    np.testing.assert_allclose(b["next_vf_preds"][2], policies["b"].value(np.array([[3.0]], np.float32))[0],
                               rtol=1e-5)
    assert len(set(a["eps_id"]) | set(b["eps_id"])) == 1
    # GAE per agent, gamma 0.5 and lambda 1, with V = 0 except V(b's last observation) = 4:
    # a: 1 + 0.5 * 1, 1 (terminated); b: each 2 + 0.5 * (what follows), from 2 + 0.5 * 4 at its truncation.
    bootstrap = {"a": np.zeros(2, np.float32), "b": np.array([0, 0, 4], np.float32)}
    values = {p: pb.with_columns(vf_preds=np.zeros(len(pb), np.float32), next_vf_preds=bootstrap[p])
              for p, pb in batch.policy_batches.items()}
    out = ComputeAdvantages(gamma=0.5, lam=1.0)(batch.with_policy_batches(values))
    assert out["a"]["value_targets"].tolist() == [1.5, 1.0]
    assert out["b"]["value_targets"].tolist() == [4.0, 4.0, 4.0]


def test_turn_based_rewards_are_credited_between_an_agents_moves_by_hand():
    # One env step per sample(): p0's first transition closes only when it moves again, a call later.
    workers = ma_workers("tests.test_multi_agent:turn_env", "independent", fragment=1)
    batches = [workers.local_worker.sample() for _ in range(4)]
    assert [sorted(b.policy_batches) for b in batches] == [[], ["p0"], ["p1"], ["p0", "p1"]]
    batch = MultiAgentBatch.concat(batches)
    assert batch.env_steps == 4 and batch.episodes == [(2.0, 4)]
    p0, p1 = batch["p0"], batch["p1"]
    # p0: moves at turns 1 and 3; +1 for its move, -0.5 for p1's that follows.
    assert p0["obs"][:, 0].tolist() == [0, 2] and p0["new_obs"][:, 0].tolist() == [2, 4]
    assert p0["rewards"].tolist() == [0.5, 0.5] and p0["terminateds"].tolist() == [False, True]
    # p1: its -0.5 before its first move belongs to no transition (it is in its return).
    assert p1["obs"][:, 0].tolist() == [1, 3] and p1["new_obs"][:, 0].tolist() == [3, 4]
    assert p1["rewards"].tolist() == [0.5, 1.0] and p1["terminateds"].tolist() == [False, True]
    assert batch.policy_episodes == {"p0": [(1.0, 2)], "p1": [(1.0, 2)]}
    assert p1["next_vf_preds"][1] == 0.0 and p0["t"].tolist() == [0, 1]


def test_agents_with_own_spaces_that_leave_early_and_join_late():
    workers = ma_workers("flowrl.testing_envs:ScriptedMultiAgentEnv", "independent", fragment=4)
    spaces = {pid: (p.observation_space.shape, p.action_space) for pid, p in workers.policies.items()}
    assert spaces["flyer"] == ((3,), gym.spaces.Box(-1, 1, (2,), np.float32)) and spaces["late"][0] == (1,)
    batch = workers.local_worker.sample()
    assert (batch.env_steps, batch.agent_steps) == (4, 8) and len(batch.episodes) == 1
    walker, flyer, late = batch["walker"], batch["flyer"], batch["late"]
    assert walker["rewards"].tolist() == walker["actions"].astype(np.float32).tolist()
    assert walker["truncateds"].tolist() == [False, False, False, True] and not walker["terminateds"].any()
    assert walker["next_vf_preds"][3] != 0.0  # truncated: bootstraps
    assert flyer["rewards"].tolist() == [0.5, 0.5] and flyer["terminateds"].tolist() == [False, True]
    assert flyer["next_vf_preds"][1] == 0.0 and flyer["actions"].shape == (2, 2)
    # late joins in step 2's observations ([2]), acts on steps 3 and 4, and terminates.
    assert late["obs"][:, 0].tolist() == [2, 3] and late["new_obs"][:, 0].tolist() == [3, 4]
    assert late["rewards"].tolist() == (10.0 * late["actions"]).tolist() and late["terminateds"].tolist() == [0, 1]
    assert late["t"].tolist() == [0, 1]
    team = sum(float(b["rewards"].sum()) for b in batch.policy_batches.values())
    assert batch.episodes == [(team, 4)]


def test_a_shared_policy_needs_agents_of_equal_spaces():
    with pytest.raises(ConfigError, match="agent 'flyer' has other spaces than policy 'shared'"):
        ma_workers("flowrl.testing_envs:ScriptedMultiAgentEnv", "shared")


def test_agents_of_one_policy_are_separate_trajectories():
    workers = ma_workers("tests.test_multi_agent:simultaneous_env", "shared", fragment=3)
    shared = workers.local_worker.sample()["shared"]
    assert shared["agent_id"].tolist() == [0, 0, 1, 1, 1]  # a's rows, then b's
    out = ComputeAdvantages(gamma=1.0, lam=1.0)(shared.with_columns(
        vf_preds=np.zeros(5, np.float32), next_vf_preds=np.zeros(5, np.float32)))
    assert out["value_targets"].tolist() == [2.0, 1.0, 6.0, 4.0, 2.0]  # b's rows do not continue a's


# ---- per-policy operators --------------------------------------------------------------------------
def _policy_batch(n, value=1.0):
    return SampleBatch({"advantages": np.arange(n, dtype=np.float32) * value})


def test_operators_apply_per_policy_and_concat_counts_env_or_agent_steps():
    batch = MultiAgentBatch({"x": _policy_batch(3), "y": _policy_batch(5, 10.0)}, env_steps=4)
    std = StandardizeFields(["advantages"])(batch)
    assert isinstance(std, MultiAgentBatch) and std.env_steps == 4
    for pid in ("x", "y"):
        assert abs(std[pid]["advantages"].mean()) < 1e-6 and abs(std[pid]["advantages"].std() - 1) < 1e-4
    assert list(SelectPolicies(["y"])(batch).policy_batches) == ["y"]
    by_env = ConcatBatches(min_batch_size=8)
    assert by_env(batch) == [] and len(by_env(batch)[0]) == 8
    agent_batch = MultiAgentBatch(batch.policy_batches, 4, count_steps_by="agent_steps")
    (out,) = ConcatBatches(min_batch_size=8)(agent_batch)
    assert (out.agent_steps, out.env_steps, len(out["y"])) == (8, 4, 5)


# ---- learning --------------------------------------------------------------------------------------
def _train_until(mapping, bound, max_env_steps, expected_policies):
    config = {"multiagent": {"policy_mapping": mapping}, "env_config": {"num_agents": 2},
              "num_envs_per_worker": 8,
              "rollout_fragment_length": 64, "train_batch_size": 512, "sgd_minibatch_size": 256, "num_sgd_iter": 10,
              "lr": 1e-3, "seed": 0}
    with flowrl.build("PPO", env=CARTPOLE, config=config) as algo:
        assert sorted(algo.workers.policies) == expected_policies
        result = {"num_env_steps_sampled": 0}
        while result["num_env_steps_sampled"] < max_env_steps:
            result = algo.train()
            returns = {p: result[f"policy/{p}/episode_return_mean"] for p in expected_policies}
            if all(r is not None and r >= bound for r in returns.values()):
                break
    assert result["num_agent_steps_sampled"] > result["num_env_steps_sampled"] > 0
    assert all(f"policy/{p}/vf_loss" in result and result[f"policy/{p}/weights_version"] > 0
               for p in expected_policies)
    return returns


def test_ppo_learns_independent_policies():
    returns = _train_until("independent", 150, 50_000, ["agent_0", "agent_1"])  # ~35k env steps
    assert min(returns.values()) >= 150, returns


def test_ppo_learns_a_shared_policy():
    returns = _train_until("shared", 150, 25_000, ["shared"])  # 2 agents, one policy: ~15k env steps
    assert returns["shared"] >= 150, returns


def test_frozen_policies_act_but_do_not_learn():
    config = {"multiagent": {"policies": ["learner", "frozen"],
                             "policy_mapping": {"agent_0": "learner", "agent_*": "frozen"},
                             "policies_to_train": ["learner"]},
              "env_config": {"num_agents": 2}, "num_envs_per_worker": 2, "rollout_fragment_length": 32,
              "train_batch_size": 64, "sgd_minibatch_size": 64, "num_sgd_iter": 1, "seed": 0}
    with flowrl.build("PPO", env=CARTPOLE, config=config) as algo:
        frozen = algo.workers.policies["frozen"].get_weights()
        result = algo.train()
        after = algo.workers.policies["frozen"].get_weights()
    assert all((frozen[k] == after[k]).all() for k in frozen)
    assert result["policy/learner/weights_version"] == 1 and result["policy/frozen/weights_version"] == 0
    assert "policy/learner/vf_loss" in result and "policy/frozen/vf_loss" not in result
    assert result["policy/frozen/episode_return_mean"] is not None


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_executors_yield_multi_agent_batches_with_per_policy_weights(executor):
    from flowrl.executors import make_executor
    from flowrl.operators import ParallelRollouts, UpdateWeights
    from flowrl.plan import Plan

    num_workers = 2 if executor == "ray" else 0
    workers = WorkerSet(num_workers=num_workers, env=CARTPOLE, env_config={"num_agents": 2}, num_envs_per_worker=2,
                        rollout_fragment_length=8, seed=0, multiagent={"policy_mapping": "independent"})
    workers.mark_trained("agent_1")  # as TrainOneStep marks what it trained
    plan = Plan(ParallelRollouts(workers).then(UpdateWeights(workers)), executor=make_executor(executor))
    with plan:
        result = plan.step()
        batch = result["output"]
        remote = workers.remote_workers.foreach("weights_version") if num_workers else []
        second = plan.step()
    assert isinstance(batch, MultiAgentBatch) and batch.env_steps == 16 * max(num_workers, 1)
    assert sorted(batch.policy_batches) == ["agent_0", "agent_1"]
    assert result["num_env_steps_sampled"] == batch.env_steps
    assert result["num_agent_steps_sampled"] == batch.agent_steps
    assert (result["policy/agent_0/weights_version"], result["policy/agent_1/weights_version"]) == (0, 1)
    assert remote == [{"agent_0": 0, "agent_1": 1}] * num_workers
    assert second["policy/agent_1/weights_version"] == 1  # nothing trained since: nothing sent


# ---- checkpoints, load_policy, eval -----------------------------------------------------------------
def test_checkpoints_hold_every_policy_and_eval_picks_one(tmp_path, capsys):
    import json

    from flowrl.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
pair:
  env: {CARTPOLE}
  run: PPO
  stop: {{timesteps_total: 128}}
  config: {{multiagent: {{policies: {{agent_0: {{lr: 0.01}}}}, policy_mapping: independent}},
           env_config: {{num_agents: 2}}, num_envs_per_worker: 2, rollout_fragment_length: 32,
           train_batch_size: 64, sgd_minibatch_size: 64, num_sgd_iter: 1, checkpoint_freq: 1, seed: 0}}
""")
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 0
    run_dir = tmp_path / "runs" / "pair" / "latest"
    capsys.readouterr()
    policy = flowrl.load_policy(run_dir, policy="agent_1")
    returns = policy.evaluate(3)
    assert len(returns) == 3 and all(r >= 8 for r in returns)  # a CartPole pole stands >= 8 steps
    with pytest.raises(flowrl.ExperimentError, match="policies agent_0, agent_1; give one"):
        flowrl.load_policy(run_dir)
    assert main(["eval", str(run_dir), "--policy", "agent_0", "--episodes", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 2
    assert main(["eval", str(run_dir), "--policy", "agent_9"]) == 2
    assert "it has no policy 'agent_9'" in capsys.readouterr().err
    # Restored, every policy has its weights, its own learning rate and its version.
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    with flowrl.restore(checkpoint) as algo:
        policies = algo.workers.policies
        assert (policies["agent_0"].lr, policies["agent_1"].lr) == (0.01, 3e-4)
        assert policies["agent_1"].weights_version == 2
        saved = flowrl.load_policy(checkpoint, policy="agent_1").policy.get_weights()
        assert all((saved[k] == v).all() for k, v in policies["agent_1"].get_weights().items())
        assert algo.train()["policy/agent_1/weights_version"] == 3


@pytest.mark.parametrize("env, mapping, agents_per_step", [
    ("pettingzoo.classic.tictactoe_v3:env", "shared", 1),                  # turn-based (AEC)
    ("pettingzoo.classic.rps_v2:parallel_env", "independent", 2),
    ("mpe2.simple_spread_v3:parallel_env", "shared", 3),
])
def test_pettingzoo_envs_train_with_ppo(env, mapping, agents_per_step):
    pytest.importorskip(env.split(".")[0])
    config = {"multiagent": {"policy_mapping": mapping}, "num_envs_per_worker": 2, "rollout_fragment_length": 32,
              "train_batch_size": 64, "sgd_minibatch_size": 64, "num_sgd_iter": 1, "seed": 0}
    with flowrl.build("PPO", env=env, config=config) as algo:
        batch = algo.workers.local_worker.sample()
        result = algo.train()
    # Every env step is one move of each agent that acts (open turn-based transitions may wait).
    assert abs(batch.agent_steps - agents_per_step * batch.env_steps) <= 2 * agents_per_step
    assert result["episodes_total"] > 0 and result["episode_return_mean"] is not None
    if env.startswith("pettingzoo.classic.tictactoe"):  # a win, a loss, a draw or an illegal move
        assert all(r in (-1.0, 0.0) for r, _ in batch.episodes)
        assert set(batch["shared"]["rewards"][batch["shared"]["terminateds"]]) <= {-1.0, 0.0, 1.0}


def test_per_policy_returns_and_agent_steps_are_stop_keys():
    from flowrl.planfile import make_experiment

    config = {"multiagent": {"policy_mapping": "independent"}, "env_config": {"num_agents": 2}}
    stop = {"policy/agent_0/episode_return_mean": 100, "num_agent_steps_sampled": 1000}
    assert make_experiment("PPO", env=CARTPOLE, config=config, stop=stop).stop == stop
    with pytest.raises(ConfigError, match="stop.policy/agent_0/return: unknown stop key"):
        make_experiment("PPO", env=CARTPOLE, config=config, stop={"policy/agent_0/return": 1})


def test_lr_schedule_follows_agent_steps_and_policies_keep_their_own_lr():
    from flowrl.operators import LearningRateSchedule
    from flowrl.plan import Plan
    from flowrl.stream import Stream

    for count_steps_by, schedule, expected in [("agent_steps", [[0, 0.01], [1000, 0.0]], (0.005, 0.005)),
                                               ("env_steps", None, (0.1, 3e-4))]:
        workers = ma_workers(CARTPOLE, "independent", env_config={"num_agents": 2}, count_steps_by=count_steps_by,
                             multiagent={"policies": {"agent_0": {"lr": 0.1}}})
        op = LearningRateSchedule(workers, lr=3e-4, schedule=schedule)
        with Plan(Stream.from_iterable(range(3)).then(op)) as plan:
            plan.ctx.counters.update(num_env_steps_sampled=250, num_agent_steps_sampled=500)
            result = plan.step()
        assert (result["policy/agent_0/lr"], result["policy/agent_1/lr"]) == pytest.approx(expected)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_self_play_adds_frozen_snapshots_while_the_plan_runs(num_workers):
    pytest.importorskip("pettingzoo")
    from examples.self_play_rps import build_self_play_plan

    config = {"multiagent": {"policies": ["main"], "policy_mapping": {"player_*": "main"}},
              "num_envs_per_worker": 2, "rollout_fragment_length": 32, "train_batch_size": 64,
              "sgd_minibatch_size": 64, "num_sgd_iter": 1, "seed": 0, "num_workers": num_workers}
    plan = functools.partial(build_self_play_plan, snapshot_every=1)
    plan.config_class = build_self_play_plan.config_class
    with flowrl.build(plan, env="pettingzoo.classic.rps_v2:parallel_env", config=config,
                      executor="ray" if num_workers else "local") as algo:
        first = algo.train()
        snapshot = algo.workers.policies["main_v1"].get_weights()
        for _ in range(2):
            result = algo.train()
        policies = algo.workers.policies
        remote = algo.workers.remote_workers.foreach("weights_version") if num_workers else []
    assert first["num_snapshots"] == 1 and result["num_snapshots"] == 3
    assert sorted(policies) == ["main", "main_v1", "main_v2", "main_v3"]
    assert all((snapshot[k] == v).all() for k, v in policies["main_v1"].get_weights().items())  # frozen
    assert not all((snapshot[k] == v).all() for k, v in policies["main"].get_weights().items())  # learns
    # After the first snapshot player_1 plays snapshots: their agents' returns are reported.
    assert result["policy/main_v1/episode_return_mean"] is not None and "policy/main_v1/vf_loss" not in result
    assert all(sorted(r) == sorted(policies) for r in remote)


def test_a_resumed_self_play_run_has_its_snapshots_and_their_mapping_again(tmp_path):
    """The policies a plan added (frozen snapshots) are in the checkpoint with the policy each
    copies; flowrl.restore makes them again with their saved weights, and the plan's snapshot
    count (a counter) maps the opponent to them as before the save."""
    pytest.importorskip("pettingzoo")
    from examples.self_play_rps import build_self_play_plan

    config = {"multiagent": {"policies": ["main"], "policy_mapping": {"player_*": "main"}},
              "num_envs_per_worker": 2, "rollout_fragment_length": 32, "train_batch_size": 64,
              "sgd_minibatch_size": 64, "num_sgd_iter": 1, "seed": 0}
    plan = functools.partial(build_self_play_plan, snapshot_every=1)
    plan.config_class = build_self_play_plan.config_class
    with flowrl.build(plan, env="pettingzoo.classic.rps_v2:parallel_env", config=config) as algo:
        for _ in range(2):
            algo.train()
        saved = {pid: p.get_weights() for pid, p in algo.workers.policies.items()}
        algo.save(tmp_path / "ckpt")
    with flowrl.restore(tmp_path / "ckpt", plan=plan) as algo:
        policies = algo.workers.policies
        assert sorted(policies) == ["main", "main_v1", "main_v2"]
        for pid, weights in saved.items():
            assert all((policies[pid].get_weights()[k] == v).all() for k, v in weights.items()), pid
        result = algo.train()
    assert result["num_snapshots"] == 3 and sorted(algo.workers.policies) == ["main", "main_v1", "main_v2", "main_v3"]
    # Episodes after the resume map player_1 to the snapshots again, not to "main".
    assert result["policy/main_v1/episode_return_mean"] is not None
    snapshot = flowrl.load_policy(tmp_path / "ckpt", policy="main_v2")
    assert all((snapshot.policy.get_weights()[k] == v).all() for k, v in saved["main_v2"].items())


def test_marks_made_while_update_weights_takes_them_wait_for_the_next_take():
    """The train and store streams mark policies from their own threads under the Ray executor
    while UpdateWeights takes the marks: every mark comes out of exactly one take."""
    import sys
    import threading

    workers = WorkerSet(num_workers=0, env=CARTPOLE, env_config={"num_agents": 2}, seed=0,
                        multiagent={"policy_mapping": "independent"})
    workers.mark_trained("agent_0")
    workers.mark_explored("agent_0")   # trained too: its weights carry the epsilon
    workers.mark_explored("agent_1")
    assert workers.take_marked() == (["agent_0"], ["agent_1"])
    assert workers.take_marked() == ([], [])

    n = 20_000
    taken: list[str] = []
    done = threading.Event()

    def mark(prefix, method):
        for i in range(n):
            method(f"{prefix}{i}")

    markers = [threading.Thread(target=mark, args=("t", workers.mark_trained)),
               threading.Thread(target=mark, args=("e", workers.mark_explored))]

    def take():
        while not done.is_set():
            trained, explored = workers.take_marked()
            taken.extend(trained + explored)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads often: without the lock this loses about a third of the marks
    try:
        taker = threading.Thread(target=take)
        taker.start()
        for t in markers:
            t.start()
        for t in markers:
            t.join()
        done.set()
        taker.join()
    finally:
        sys.setswitchinterval(interval)
    trained, explored = workers.take_marked()
    taken.extend(trained + explored)
    assert len(taken) == 2 * n
    assert set(taken) == {f"{p}{i}" for p in "te" for i in range(n)}
