"""Rollout workers and policies: batch layout, autoreset masking, bootstrapping, seeding."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl.envs import EnvError, make_vector_env
from flowrl.operators import trajectory_ends
from flowrl.policy import TorchPolicy, obs_to_array, register_model
from flowrl.rollout import RolloutWorker
from flowrl.testing import same_experience


class CountdownEnv(gym.Env):
    """Observation = steps left; terminates after `length` steps, or truncates at `limit`."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length=3, limit=None):
        self.length, self.limit = length, limit

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([self.length], np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.array([self.length - self.t], np.float32)
        terminated = self.t >= self.length
        truncated = self.limit is not None and self.t >= self.limit and not terminated
        return obs, 1.0, terminated, truncated, {}


ENTRY = "tests.test_rollouts:CountdownEnv"


def test_no_reset_row_reaches_a_batch_and_fragments_are_exact():
    w = RolloutWorker(ENTRY, num_envs_per_worker=2, rollout_fragment_length=7, env_config={"length": 3})
    b = w.sample()
    assert len(b) == 14
    # every row is a real transition of a 3-step episode: obs counts down 3, 2, 1
    assert set(zip(b["obs"][:, 0].tolist(), b["new_obs"][:, 0].tolist())) <= {(3, 2), (2, 1), (1, 0)}
    assert b["t"][:7].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert b["terminateds"][:7].tolist() == [False, False, True] * 2 + [False]
    assert b.episodes == [(3.0, 3)] * 4
    w.close()


def test_episodes_keep_eps_id_across_fragments():
    w = RolloutWorker(ENTRY, num_envs_per_worker=1, rollout_fragment_length=2, env_config={"length": 3})
    b1, b2 = w.sample(), w.sample()
    assert b1["eps_id"].tolist() == [b1["eps_id"][0]] * 2
    assert b2["eps_id"][0] == b1["eps_id"][0] and b2["t"][0] == 2
    assert b2["eps_id"][1] != b1["eps_id"][0] and b2["t"][1] == 0


def test_truncated_rows_bootstrap_from_final_obs_value_terminated_rows_do_not():
    w = RolloutWorker(ENTRY, num_envs_per_worker=1, rollout_fragment_length=4, env_config={"length": 10, "limit": 2})
    b = w.sample()
    assert b["truncateds"].tolist() == [False, True, False, True]
    expected = w.policy.value(b["new_obs"][b["truncateds"]])
    np.testing.assert_allclose(b["next_vf_preds"][b["truncateds"]], expected, rtol=1e-6)
    w2 = RolloutWorker(ENTRY, rollout_fragment_length=3, env_config={"length": 3})
    b = w2.sample()
    assert b["terminateds"][2] and b["next_vf_preds"][2] == 0.0
    np.testing.assert_allclose(b["next_vf_preds"][:2], b["vf_preds"][1:3], rtol=1e-6)


def test_fragment_end_bootstraps_and_trajectory_ends_marks_it():
    w = RolloutWorker(ENTRY, num_envs_per_worker=2, rollout_fragment_length=2, env_config={"length": 5})
    b = w.sample()
    assert trajectory_ends(b).tolist() == [False, True, False, True]
    np.testing.assert_allclose(b["next_vf_preds"][[1, 3]], w.policy.value(b["new_obs"][[1, 3]]), rtol=1e-6)


def test_batch_has_the_standard_columns_and_spaces():
    w = RolloutWorker("CartPole-v1", num_envs_per_worker=3, rollout_fragment_length=5, seed=0)
    b = w.sample()
    for col in ("obs", "new_obs", "actions", "rewards", "terminateds", "truncateds", "eps_id", "t",
                "action_logp", "vf_preds", "weights_version", "next_vf_preds"):
        assert col in b
    assert b.spaces["obs"] == gym.spaces.Box(-np.inf, np.inf, (4,), np.float32) or b.spaces["obs"].shape == (4,)
    assert b.spaces["actions"] == gym.spaces.Discrete(2)
    assert (b["weights_version"] == 0).all()


def test_same_seed_same_batches():
    a = RolloutWorker("CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=20, seed=3).sample()
    b = RolloutWorker("CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=20, seed=3).sample()
    assert same_experience(a, b)   # eps_id aside: each worker instance draws a random base for its ids


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_sync_and_async_vectorization(vectorization):
    w = RolloutWorker("CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=5, seed=0,
                      vectorization=vectorization)
    assert len(w.sample()) == 10
    w.close()


def test_unknown_env_suggests_a_close_name():
    with pytest.raises(EnvError, match="did you mean 'CartPole-v1'"):
        make_vector_env("CartPole-v2")
    with pytest.raises(EnvError, match="cannot load entry point"):
        make_vector_env("nowhere.module:Env")
    with pytest.raises(EnvError, match="bad env_config"):
        make_vector_env(ENTRY, env_config={"nope": 1})


# ---- policies ------------------------------------------------------------------------------------
def test_gaussian_actions_are_clipped_for_the_env_but_logp_is_of_the_sample():
    space = gym.spaces.Box(-0.1, 0.1, (2,), np.float32)
    policy = TorchPolicy(gym.spaces.Box(-1, 1, (3,)), space, seed=0)
    out = policy.compute_actions(np.zeros((256, 3), np.float32))
    assert np.all(np.abs(out.env_actions) <= 0.1 + 1e-7) and np.abs(out.actions).max() > 0.1
    dist = policy.dist(policy.model(torch.zeros(256, 3))[0])
    np.testing.assert_allclose(dist.log_prob(torch.as_tensor(out.actions)).detach().numpy(), out.logp, rtol=1e-5)


@pytest.mark.parametrize("obs_space, act_space", [
    (gym.spaces.Box(0, 255, (16, 16, 3), np.uint8), gym.spaces.Discrete(3)),
    (gym.spaces.Dict({"a": gym.spaces.Discrete(3), "b": gym.spaces.Box(-1, 1, (2,))}), gym.spaces.MultiDiscrete([2, 3])),
    (gym.spaces.Tuple([gym.spaces.MultiBinary(4), gym.spaces.Discrete(2)]), gym.spaces.Box(-1, 1, (1,))),
])
def test_models_for_image_dict_and_tuple_observations(obs_space, act_space):
    obs_space.seed(0)
    policy = TorchPolicy(obs_space, act_space, seed=0)
    samples = [obs_space.sample() for _ in range(5)]
    if isinstance(obs_space, gym.spaces.Dict):
        batch = {k: np.stack([s[k] for s in samples]) for k in obs_space.spaces}
    elif isinstance(obs_space, gym.spaces.Tuple):
        batch = tuple(np.stack([s[i] for s in samples]) for i in range(len(obs_space.spaces)))
    else:
        batch = np.stack(samples)
    obs = obs_to_array(obs_space, batch)
    out = policy.compute_actions(obs)
    assert out.logp.shape == (5,) and out.values.shape == (5,)
    for a in out.env_actions:
        assert act_space.contains(np.asarray(a, dtype=act_space.dtype) if act_space.shape else int(a))


@pytest.mark.parametrize("act_space", [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,)),
                                       gym.spaces.MultiDiscrete([2, 3])])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_numpy_inference_follows_the_torch_model_through_updates_loads_and_copies(act_space, activation):
    import copy

    policy = TorchPolicy(gym.spaces.Box(-1, 1, (4,)), act_space, model={"activation": activation}, seed=0)
    obs = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)

    def assert_same(model):
        logits, values = model(torch.as_tensor(obs))
        fast = model.numpy_forward(obs)
        np.testing.assert_allclose(fast[0], logits.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fast[1], values.detach().numpy(), rtol=1e-5, atol=1e-6)

    assert_same(policy.model)
    loss = sum(p.square().sum() for p in policy.model.parameters())
    loss.backward()
    policy.optimizer.step()  # updates the parameters in place: the numpy views see it
    assert_same(policy.model)
    other = TorchPolicy(gym.spaces.Box(-1, 1, (4,)), act_space, model={"activation": activation}, seed=1)
    policy.set_weights(other.get_weights())
    assert_same(policy.model)
    target = copy.deepcopy(policy.model)  # a target network: views of its own parameters
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(0.5)
    assert_same(target)
    assert_same(policy.model)
    out = policy.compute_actions(obs, explore=False)
    logits, _ = policy.model(torch.as_tensor(obs))
    expected = policy.dist(logits).log_prob(torch.as_tensor(out.actions)).detach().numpy()
    np.testing.assert_allclose(out.logp, expected, rtol=1e-5, atol=1e-5)


def test_models_without_a_numpy_form_act_through_torch():
    image = TorchPolicy(gym.spaces.Box(0, 255, (16, 16, 3), np.uint8), gym.spaces.Discrete(3), seed=0)
    elu = TorchPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), model={"activation": "elu"}, seed=0)
    assert image.model.numpy_forward(np.zeros((1, 16, 16, 3), np.uint8)) is None
    assert elu.model.numpy_forward(np.zeros((1, 4), np.float32)) is None
    out = elu.compute_actions(np.zeros((3, 4), np.float32))
    assert out.logp.shape == (3,) and out.values.dtype == np.float32


def test_greedy_actions_are_the_mode():
    policy = TorchPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), seed=0)
    obs = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    a1 = policy.compute_actions(obs, explore=False).actions
    a2 = policy.compute_actions(obs, explore=False).actions
    assert (a1 == a2).all()


class TinyModel(torch.nn.Module):
    def __init__(self, observation_space, action_space, num_outputs, model_config):
        super().__init__()
        self.net = torch.nn.Linear(int(np.prod(observation_space.shape)), num_outputs + 1)

    def forward(self, obs):
        out = self.net(obs.float())
        return out[:, :-1], out[:, -1]


def test_custom_model_by_name_or_entry_point():
    register_model("tiny", TinyModel)
    for spec in ("tiny", "tests.test_rollouts:TinyModel"):
        policy = TorchPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), model={"custom_model": spec})
        assert isinstance(policy.model, TinyModel)
    with pytest.raises(ValueError, match="unknown custom_model 'nope'"):
        TorchPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), model={"custom_model": "nope"})


def test_weights_round_trip_with_version():
    a = TorchPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), seed=0)
    b = TorchPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), seed=1)
    b.set_weights(a.get_weights(), version=7)
    obs = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(a.value(obs), b.value(obs))
    assert b.weights_version == 7


@pytest.mark.parametrize("act_space", [gym.spaces.Discrete(3, start=1), gym.spaces.MultiDiscrete([2, 4]),
                                       gym.spaces.Box(-1, 1, (2,))])
def test_sampled_logp_matches_the_loss_distribution(act_space):
    policy = TorchPolicy(gym.spaces.Box(-1, 1, (3,)), act_space, seed=0)
    obs = np.random.default_rng(1).standard_normal((64, 3)).astype(np.float32)
    out = policy.compute_actions(obs)
    dist = policy.dist(policy.model(torch.as_tensor(obs))[0])
    np.testing.assert_allclose(dist.log_prob(torch.as_tensor(out.actions)).detach().numpy(), out.logp,
                               rtol=1e-4, atol=1e-5)
    for a in out.env_actions:
        assert act_space.contains(a.astype(act_space.dtype) if act_space.shape else int(a))


def test_categorical_sampling_follows_the_probabilities():
    policy = TorchPolicy(gym.spaces.Box(-1, 1, (1,)), gym.spaces.Discrete(3), seed=0)
    obs = np.zeros((20000, 1), np.float32)
    out = policy.compute_actions(obs)
    probs = np.exp(policy.dist(policy.model(torch.as_tensor(obs[:1]))[0]).dist.logits.detach().numpy()[0])
    np.testing.assert_allclose(np.bincount(out.actions, minlength=3) / len(obs), probs, atol=0.015)


def test_model_forward_follows_weight_updates_copies_and_loads():
    import copy

    policy = TorchPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), seed=0)
    obs = torch.ones(3, 4)
    before = policy.model(obs)[1].detach().clone()
    target = copy.deepcopy(policy.model)
    loss = policy.model(obs)[1].sum()
    policy.optimizer.zero_grad()
    loss.backward()
    policy.optimizer.step()
    after = policy.model(obs)[1].detach()
    assert not torch.allclose(before, after)                  # the optimizer's update is seen
    torch.testing.assert_close(target(obs)[1], before)        # a deepcopy keeps its own weights
    target.load_state_dict(policy.model.state_dict())
    torch.testing.assert_close(target(obs)[1], after)         # load_state_dict is seen too
    reference = policy.model.vf[4](policy.model.vf[3](policy.model.vf[2](policy.model.vf[1](policy.model.vf[0](obs)))))
    torch.testing.assert_close(after, reference.squeeze(-1))  # same math as the modules' own calls
