"""PolicyStack: policies acting as one give the actions each would give alone, follow changes of
their weights, and a multi-agent worker's independent policies act through one."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl.multi_agent_rollout import MultiAgentRolloutWorker
from flowrl.policy import TorchPolicy, categorical
from flowrl.policy_stack import PolicyStack, stacks

OBS = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
ACTIONS = gym.spaces.Discrete(3, start=1)


def test_categorical_by_hand():
    # p = (0.2, 0.5, 0.3): the CDF is (0.2, 0.7, 1.0); a uniform u picks the first step above it.
    logp_all = np.log(np.array([[0.2, 0.5, 0.3]] * 4, np.float32))
    actions, logp = categorical(logp_all, np.array([[0.1], [0.3], [0.69], [0.95]]))
    assert actions.tolist() == [0, 1, 1, 2]
    np.testing.assert_allclose(logp, np.log([0.2, 0.5, 0.5, 0.3]), rtol=1e-6)
    greedy, greedy_logp = categorical(logp_all[:1], None)
    assert greedy.tolist() == [1] and greedy_logp.tolist() == pytest.approx([np.log(0.5)])


def _policies(n=4, **model):
    return [TorchPolicy(OBS, ACTIONS, model=model or None, seed=i) for i in range(n)]


def _obs(counts, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((k, 4)).astype(np.float32) for k in counts]


def _assert_as_alone(stack, alone, obs, explore=True):
    """The stack's Actions are those of the policies `alone` (copies in the same state) acting
    one by one, concatenated: equal actions, floats to rounding (padding changes BLAS's blocking)."""
    out = stack.compute_actions(obs, explore)
    parts = [p.compute_actions(o, explore) for p, o in zip(alone, obs)]
    np.testing.assert_array_equal(out.actions, np.concatenate([a.actions for a in parts]))
    np.testing.assert_array_equal(out.env_actions, np.concatenate([a.env_actions for a in parts]))
    np.testing.assert_allclose(out.logp, np.concatenate([a.logp for a in parts]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.values, np.concatenate([a.values for a in parts]), rtol=1e-5, atol=1e-6)
    assert out.actions.dtype == np.int64 and out.logp.dtype == np.float32 and out.values.dtype == np.float32


@pytest.mark.parametrize("counts", [(8, 8, 8, 8), (8, 3, 1, 6)])
def test_a_stack_acts_as_each_policy_alone(counts):
    policies = _policies()
    alone = copy.deepcopy(policies)  # the same weights and sampling generators
    stack = PolicyStack(policies)
    assert stack._stacked_layers() is not None  # acting as one, not one by one
    for step in range(20):  # each policy's generator moves on as it would alone
        _assert_as_alone(stack, alone, _obs(counts, step))
    _assert_as_alone(stack, alone, _obs(counts), explore=False)


def test_a_stack_follows_optimizer_steps_and_set_weights():
    policies = _policies(2)
    stack = PolicyStack(policies)
    obs = _obs((5, 2))
    before = stack.compute_actions(obs, explore=False).values
    # A fused Adam step changes the parameters in place without bumping their tensor versions.
    policy = policies[1]
    loss = policy.model(torch.as_tensor(obs[1]))[1].sum()
    loss.backward()
    policy.optimizer.step()
    after_step = stack.compute_actions(obs, explore=False).values
    np.testing.assert_array_equal(after_step[:5], before[:5])
    np.testing.assert_allclose(after_step[5:], policy.compute_actions(obs[1], explore=False).values, rtol=1e-5)
    assert not np.allclose(after_step[5:], before[5:])
    policies[0].set_weights(policies[1].get_weights())
    np.testing.assert_allclose(stack.compute_actions(obs, explore=False).values[:5],
                               policies[1].compute_actions(obs[0], explore=False).values, rtol=1e-5)


def test_policies_of_other_shapes_act_one_by_one():
    policies = _policies(2) + [TorchPolicy(OBS, ACTIONS, model={"hidden": [16]}, seed=2)]
    assert stacks(policies) == [[0, 1, 2]]  # same kind and spaces: their layers are seen when they act
    stack = PolicyStack(policies)
    assert stack._stacked_layers() is None
    _assert_as_alone(stack, copy.deepcopy(policies), _obs((3, 4, 2)))


def test_stacks_group_discrete_torch_policies_of_equal_spaces():
    box_actions = TorchPolicy(OBS, gym.spaces.Box(-1, 1, (2,), np.float32), seed=0)
    other_obs = TorchPolicy(gym.spaces.Box(-1, 1, (3,), np.float32), ACTIONS, seed=0)
    policies = [*_policies(2), box_actions, other_obs, *_policies(1)]
    assert stacks(policies) == [[0, 1, 4], [2], [3]]
    with pytest.raises(ValueError, match="PolicyStack"):
        PolicyStack([policies[0], box_actions])


def test_independent_policies_act_as_one_with_the_actions_they_would_take_alone():
    def worker():
        return MultiAgentRolloutWorker("flowrl.testing_envs:multi_agent_cartpole", {"policy_mapping": "independent"},
                                       env_config={"num_agents": 4}, num_envs_per_worker=4, rollout_fragment_length=32,
                                       seed=3)

    together, alone = worker(), worker()
    alone._stacks_of = lambda pids: [([pid], PolicyStack([alone.policies[pid]])) for pid in sorted(pids)]
    assert [len(s.policies) for _, s in together._stacks_of(together.policies)] == [4]
    for _ in range(8):  # 1024 env steps: agents leave early, so policies act on different counts
        a, b = together.sample(), alone.sample()
        assert sorted(a.policy_batches) == sorted(b.policy_batches)
        for pid, batch in a.policy_batches.items():
            other = b.policy_batches[pid]
            for column in ("obs", "actions", "rewards", "terminateds", "truncateds", "t", "agent_id"):
                np.testing.assert_array_equal(batch[column], other[column])
            # Episode ids start at a random base per worker.
            np.testing.assert_array_equal(batch["eps_id"] - together._eps_id_base, other["eps_id"] - alone._eps_id_base)
            for column in ("action_logp", "vf_preds", "next_vf_preds"):
                np.testing.assert_allclose(batch[column], other[column], rtol=1e-5, atol=1e-6)
