"""APPO multi-agent: V-trace over each agent's trajectory with its own policy's networks, the
policy lag per policy, target networks for every policy to train, and learning on a 2-agent
CartPole (independent and shared policies) with the Ray executor."""

import numpy as np
import pytest
import torch

import flowrl
from flowrl.multi_agent_batch import MultiAgentBatch
from flowrl.operators import UpdateTargetNetwork
from flowrl.plan import Plan
from flowrl.plans.appo import APPOConfig, PolicyLag, VTraceTargets
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.stream import Stream

CARTPOLE = "flowrl.testing_envs:multi_agent_cartpole"
GAMMA = 0.5


def _workers():
    """Agents 0 and 1 share p, agent 2 has q, agent 3's f is frozen (no target network)."""
    return WorkerSet(env=CARTPOLE, env_config={"num_agents": 4}, rollout_fragment_length=4, seed=0,
                     multiagent={"policies": ["p", "q", "f"], "policies_to_train": ["p", "q"],
                                 "policy_mapping": {"agent_[01]": "p", "agent_2": "q", "agent_3": "f"}})


def _rows(agent_id, t, rewards, terminated_last, versions, seed):
    n = len(t)
    rng = np.random.default_rng(seed)
    terminateds = np.zeros(n, bool)
    terminateds[-1] = terminated_last
    obs = rng.normal(size=(n + 1, 4)).astype(np.float32)  # a trajectory: each row's new_obs is the next's obs
    return SampleBatch({"obs": obs[:-1], "new_obs": obs[1:],
                        "actions": rng.integers(0, 2, n), "rewards": np.array(rewards, np.float32),
                        "terminateds": terminateds, "truncateds": np.zeros(n, bool), "eps_id": np.full(n, 7),
                        "t": np.array(t), "action_logp": np.full(n, -50.0, np.float32),  # pi/mu >> 1: rho = c = 1
                        "weights_version": np.array(versions), "agent_id": np.array(agent_id)})


def _batch():
    # p: agent 0's steps 0-2 (its fragment ends there, not its episode), then agent 1's steps 3-4 of
    # the same episode, which end it. Only agent_id tells the two trajectories apart.
    p = SampleBatch.concat([_rows([0] * 3, [0, 1, 2], [1.0, 2.0, 3.0], False, [5, 3, 4], seed=1),
                            _rows([1] * 2, [3, 4], [4.0, 5.0], True, [1, 5], seed=2)])
    q = _rows([2] * 2, [0, 1], [1.0, 1.0], False, [2, 0], seed=3)
    f = _rows([3], [0], [1.0], False, [0], seed=4)
    return MultiAgentBatch({"p": p, "q": q, "f": f}, env_steps=5)


def _with_target_networks(workers):
    """UpdateTargetNetwork as APPO's plan makes it: a target network for every policy to train."""
    op = UpdateTargetNetwork(workers, every_steps=1, policy_ids=workers.policies_to_train)
    with Plan(Stream.from_iterable([0]).then(op)) as plan:
        plan.step()
    return workers


def test_appo_makes_a_target_network_for_each_policy_to_train():
    policies = _with_target_networks(_workers()).policies
    assert policies["p"].target_model is not policies["q"].target_model
    assert not hasattr(policies["f"], "target_model")  # frozen: not APPO's to train
    for pid in ("p", "q"):
        target, model = policies[pid].target_model.state_dict(), policies[pid].model.state_dict()
        assert all(torch.equal(target[k], model[k]) for k in model)


def test_vtrace_runs_per_agent_trajectory_with_each_policys_networks():
    workers = _with_target_networks(_workers())
    policies = workers.policies
    batch = _batch()
    out = VTraceTargets(workers, APPOConfig(gamma=GAMMA))(batch)
    assert out["f"] is batch["f"]  # frozen: passed on as it is
    for pid, trajectories in (("p", [slice(0, 3), slice(3, 5)]), ("q", [slice(0, 2)])):
        rows, policy = batch[pid], policies[pid]
        values, next_values = policy.value(rows["obs"]), policy.value(rows["new_obs"])
        vs, advantages = np.zeros(len(rows)), np.zeros(len(rows))
        for trajectory in trajectories:
            # rho = c = 1: v_t = r_t + gamma v_{t+1}, from r + gamma V(s') (0 if terminated) at the end.
            steps = range(len(rows))[trajectory]
            end = steps[-1]
            following = 0.0 if rows["terminateds"][end] else next_values[end]
            for t in reversed(steps):
                advantages[t] = rows["rewards"][t] + GAMMA * following - values[t]
                vs[t] = rows["rewards"][t] + GAMMA * following
                following = vs[t]
        np.testing.assert_allclose(out[pid]["vs"], vs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[pid]["pg_advantages"], advantages, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            dist_inputs, _ = policy.target_model(torch.as_tensor(rows["obs"]))
            target_logp = policy.dist(dist_inputs, model=policy.target_model).log_prob(
                torch.as_tensor(rows["actions"]))
        np.testing.assert_allclose(out[pid]["target_logp"], target_logp.numpy(), rtol=1e-5)


def test_policy_lag_is_per_policy_and_over_the_policies_to_train():
    workers = _workers()
    versions = {"p": 5, "q": 2, "f": 9}
    for pid, version in versions.items():
        workers.policies[pid].weights_version = version
    lag = PolicyLag(workers)
    batch = _batch()
    assert lag(batch) is batch
    # p: 5 - [5, 3, 4, 1, 5] = [0, 2, 1, 4, 0]; q: 2 - [2, 0] = [0, 2]; f (frozen, lag 9) left out.
    assert lag.add_to_stats({}) == {"mean_policy_lag": 9 / 7, "max_policy_lag": 4,
                                    "policy/p/mean_policy_lag": 1.4, "policy/p/max_policy_lag": 4,
                                    "policy/q/mean_policy_lag": 1.0, "policy/q/max_policy_lag": 2}


# Env steps until every policy's episode_return_mean >= 80 (random: ~22), seeds 0/1/2: independent
# 14.8k / 17.4k / 21.5k, shared 8.4k / 10.8k / 9.3k (2 Ray workers, ~10 s each).
@pytest.mark.parametrize("mapping, policies, max_env_steps", [
    ("independent", ["agent_0", "agent_1"], 40_000),
    ("shared", ["shared"], 25_000),
])
def test_appo_learns_multi_agent_cartpole_on_ray(ray_session, mapping, policies, max_env_steps):
    config = {"multiagent": {"policy_mapping": mapping}, "env_config": {"num_agents": 2},
              "num_workers": 2, "num_cpus_per_worker": 0.5, "num_envs_per_worker": 4, "rollout_fragment_length": 32,
              "train_batch_size": 256, "sgd_minibatch_size": 128, "num_sgd_iter": 2, "target_update_freq": 512,
              "seed": 0}
    with flowrl.build("APPO", env=CARTPOLE, config=config, executor="ray") as algo:
        result = {"num_env_steps_sampled": 0}
        returns = {}
        while result["num_env_steps_sampled"] < max_env_steps:
            result = algo.train()
            returns = {p: result[f"policy/{p}/episode_return_mean"] or 0.0 for p in policies}
            if min(returns.values()) >= 80:
                break
        assert all(algo.workers.policies[p].target_model is not None for p in policies)
    assert min(returns.values()) >= 80, returns
    assert result["num_target_updates"] > 0
    for p in policies:
        assert result[f"policy/{p}/weights_version"] > 0
        assert 0 <= result[f"policy/{p}/mean_policy_lag"] <= result[f"policy/{p}/max_policy_lag"]
    assert 0 <= result["mean_policy_lag"] <= result["max_policy_lag"]
