"""env_wrappers: wrappers by class path in order, the atari and normalize presets, normalize
statistics merged across workers, saved in checkpoints, and applied frozen in evaluation."""

import pickle
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import flowrl
from flowrl.cli import main as run_cli
from flowrl.config import CommonConfig, ConfigError, parse_config
from flowrl.env_pipeline import EnvPipeline
from flowrl.envs import make_env
from flowrl.normalize import Normalizer, RunningMeanStd
from flowrl.rollout import RolloutWorker, evaluate_policy
from flowrl.sample_batch import SampleBatch


# ---- test envs and wrappers (loaded by class path, as a plan file names them) --------------------------
class CountEnv(gym.Env):
    """Observation [t, 10 t] at step t of an episode of `length` steps; reward t."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length: int = 3):
        self.length = length

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 0.0]), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t, 10.0 * self.t]), float(self.t), self.t == self.length, False, {}


class Affine(gym.ObservationWrapper):
    """obs * scale + shift."""

    def __init__(self, env, scale: float = 1.0, shift: float = 0.0):
        super().__init__(env)
        self.scale, self.shift = scale, shift
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float64)

    def observation(self, obs):
        return obs * self.scale + self.shift


SEEN: list[np.ndarray] = []  # raw observations the Record wrapper passed on


class Record(gym.ObservationWrapper):
    def observation(self, obs):
        SEEN.append(np.array(obs))
        return obs

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        SEEN.append(np.array(obs))
        return obs, info


class SignEnv(gym.Env):
    """One-step episodes: observation 1000 + s with s = +-1 at random; reward 1 when the action is
    1 for s = +1 and 0 for s = -1. A policy that acts on (obs - 1000) scores 1; on raw obs, 0.5."""

    observation_space = gym.spaces.Box(0, 2000, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.s = self.np_random.choice([-1.0, 1.0])
        return np.array([1000.0 + self.s], np.float32), {}

    def step(self, action):
        reward = float(int(action) == (self.s > 0))
        return np.array([1000.0], np.float32), reward, True, False, {}


HERE = "tests.test_env_pipelines"


# ---- wrappers by class path --------------------------------------------------------------------------
def test_wrappers_apply_in_the_order_given_with_their_kwargs_in_workers_and_evaluation():
    wrappers = [{f"{HERE}:Affine": {"scale": 2.0, "shift": 1.0}}, {f"{HERE}.Affine": {"scale": 3.0}}]
    worker = RolloutWorker(f"{HERE}:CountEnv", num_envs_per_worker=2, rollout_fragment_length=4, seed=0,
                           env_wrappers=wrappers, env_config={"length": 3})
    obs = worker.sample()["obs"]
    # Episode of sub-env 0: t = 0, 1, 2 then t = 0 again: ((t, 10t) * 2 + 1) * 3.
    assert obs[:4].tolist() == [[3, 3], [9, 63], [15, 123], [3, 3]]
    env = make_env(f"{HERE}:CountEnv", {"length": 3}, EnvPipeline.parse(list(reversed(wrappers))))
    assert env.reset()[0].tolist() == [1, 1]  # (0 * 3) * 2 + 1: the other order


def test_gymnasium_dotted_paths_and_kwargs():
    worker = RolloutWorker("CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=16, seed=0,
                           env_wrappers=[{"gymnasium.wrappers.TimeLimit": {"max_episode_steps": 3}}])
    batch = worker.sample()
    assert batch.episodes and all(length <= 3 for _, length in batch.episodes)
    assert batch["t"].max() <= 2


@pytest.mark.parametrize("wrappers, key, message", [
    (["gymnasium.wrappers.NoSuchWrapper"], "config.env_wrappers[0]", "cannot load wrapper"),
    (["nosuchpkg.mod:Wrapper"], "config.env_wrappers[0]", "cannot load wrapper"),
    (["notapath"], "config.env_wrappers[0]", "neither a preset"),
    ([{"gymnasium.wrappers.TimeLimit": {"max_steps": 3}}],
     "config.env_wrappers[0].gymnasium.wrappers.TimeLimit.max_steps", "did you mean 'max_episode_steps'"),
    ([{"gymnasium.wrappers.TimeLimit": {}}], "config.env_wrappers[0].gymnasium.wrappers.TimeLimit",
     "missing a required argument"),
    ([{"atari": {"frames": 3}}], "config.env_wrappers[0].atari.frames", "unknown option of the atari preset"),
    (["normalize", "gymnasium.wrappers.ClipAction"], "config.env_wrappers[1]", "normalize must come last"),
    ([3], "config.env_wrappers[0]", "expected a class path"),
    ([{"atari": {"noop_max": "many"}}], "config.env_wrappers[0].atari.noop_max", "expected an integer"),
    ([{"normalize": {"gamma": 1.5}}], "config.env_wrappers[0].normalize", "out of range"),
    (["gymnasium.wrappers.ClipAction", "atari"], "config.env_wrappers[1]", "atari must come first"),
])
def test_bad_wrappers_name_the_key(wrappers, key, message):
    with pytest.raises(ConfigError) as info:
        parse_config(CommonConfig, {"env_wrappers": wrappers})
    assert info.value.key == key and message in info.value.message


def test_a_bad_wrapper_is_one_line_naming_the_file_from_the_cli(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("tiny:\n  env: CartPole-v1\n  run: PPO\n  stop: {timesteps_total: 64}\n  config:\n"
                    "    env_wrappers: [gymnasium.wrappers.NoSuchWrapper]\n")
    assert run_cli(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"flowrl: error: {plan}: experiment 'tiny': config.env_wrappers[0]: "
                                                   "cannot load wrapper 'gymnasium.wrappers.NoSuchWrapper'")


# ---- the atari preset -----------------------------------------------------------------------------------
def test_atari_preset_gives_uint8_stacks_and_clipped_training_rewards_with_raw_episode_returns():
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    wrappers = ["atari", {"gymnasium.wrappers.TimeLimit": {"max_episode_steps": 100}}]
    worker = RolloutWorker("ALE/SpaceInvaders-v5", num_envs_per_worker=1, rollout_fragment_length=100, seed=0,
                           env_wrappers=wrappers)
    assert worker.observation_space == gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    batch = worker.sample()
    assert batch["obs"].dtype == np.uint8 and batch["obs"].shape == (100, 84, 84, 4)
    assert pickle.loads(pickle.dumps(batch))["new_obs"].dtype == np.uint8  # as Ray carries it
    assert set(np.unique(batch["rewards"])) <= {0.0, 1.0}
    # The same episode played again (same seed, same actions) in one env with the same pipeline.
    env = make_env("ALE/SpaceInvaders-v5", None, EnvPipeline.parse(wrappers))
    obs, _ = env.reset(seed=worker.seed)
    assert np.array_equal(obs, batch["obs"][0])
    raw = [env.step(int(a))[1] for a in batch["actions"]]
    (episode_return, length), = batch.episodes
    assert length == 100 and episode_return == sum(raw)
    assert np.array_equal(batch["rewards"], np.sign(raw))
    assert episode_return > batch["rewards"].sum()  # invaders are worth 5 to 30 points: clipping showed
    # Frame skip from the v5 env (4 frames a step), not again in the wrapper; the stack's last frame
    # is the newest, and the first three are the previous observation's last three.
    assert env.unwrapped._frameskip == 4 and env.get_wrapper_attr("frame_skip") == 1
    assert np.array_equal(batch["obs"][1][..., :3], batch["obs"][0][..., 1:])
    # An env made with frameskip 1 is skipped (and max-pooled) by the wrapper instead.
    env = make_env("ALE/SpaceInvaders-v5", {"frameskip": 1}, EnvPipeline.parse(["atari"]))
    assert env.get_wrapper_attr("frame_skip") == 4


class _FireGame(gym.Env):
    """Records the actions it is given; a game whose actions include FIRE."""

    observation_space = gym.spaces.Box(0, 255, (2,), np.uint8)
    action_space = gym.spaces.Discrete(4)

    def __init__(self, end_at: int | None = None):
        self.actions, self.end_at = [], end_at

    def get_action_meanings(self):
        return ["NOOP", "FIRE", "RIGHT", "LEFT"]

    def reset(self, *, seed=None, options=None):
        self.actions.append("reset")
        return np.zeros(2, np.uint8), {}

    def step(self, action):
        self.actions.append(int(action))
        return np.zeros(2, np.uint8), 1.0, len(self.actions) == self.end_at, False, {}


def test_fire_reset_presses_fire_and_the_next_action_at_each_reset():
    from flowrl.env_pipeline import FireReset

    game = _FireGame()
    env = FireReset(game)
    env.reset(seed=0)
    env.step(3)
    assert game.actions == ["reset", 1, 2, 3]
    game = _FireGame(end_at=2)  # the game ends on the first FIRE: reset again
    FireReset(game).reset()
    assert game.actions == ["reset", 1, "reset", 2]


def test_the_atari_preset_fires_at_reset_only_in_games_that_have_fire():
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    from flowrl.env_pipeline import FireReset

    def wrappers(env):
        while isinstance(env, gym.Wrapper):
            yield type(env)
            env = env.env

    assert FireReset in wrappers(make_env("ALE/Breakout-v5", None, EnvPipeline.parse(["atari"])))
    assert FireReset not in wrappers(make_env("ALE/Freeway-v5", None, EnvPipeline.parse(["atari"])))
    off = EnvPipeline.parse([{"atari": {"fire_reset": False}}])
    assert FireReset not in wrappers(make_env("ALE/Breakout-v5", None, off))


def test_the_atari_preset_without_opencv_says_which_extra_to_install(monkeypatch):
    pytest.importorskip("ale_py")
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ConfigError, match=r"needs cv2 \(pip install 'flowrl\[atari\]'\)"):
        make_env("ALE/Pong-v5", None, EnvPipeline.parse(["atari"]))


# ---- normalize: running statistics -------------------------------------------------------------------
def test_running_mean_std_merge_is_the_pooled_data_by_hand():
    a, b = RunningMeanStd(()), RunningMeanStd(())
    a.update(np.array([1.0, 3.0]))
    b.update(np.array([5.0]))
    a.merge(b)
    # [1, 3, 5]: mean 3, squared deviations 4 + 0 + 4 = 8, variance 8 / 3.
    assert (a.count, a.mean, a.m2) == (3.0, 3.0, 8.0)
    assert a.var == pytest.approx(8 / 3, abs=1e-15)


def test_normalized_observations_and_scaled_rewards_by_hand():
    n = Normalizer((), gamma=0.5)
    assert n.observations(np.array([1.0, 3.0, 5.0]))[2] == pytest.approx(2 / np.sqrt(8 / 3 + 1e-8), abs=1e-6)
    assert n.observations(np.array([1003.0]), update=False)[0] == 10.0  # clipped at 10
    counted = np.array([True])
    # Discounted returns 1, then 1 * 0.5 + 1 = 1.5: variance 0 (reward 1 / 1e-4 clipped to 10), then 0.0625.
    assert n.rewards(np.array([1.0]), np.array([1.0]), counted)[0] == 10.0
    assert n.rewards(np.array([1.0]), np.array([1.5]), counted)[0] == pytest.approx(1 / np.sqrt(0.0625 + 1e-8),
                                                                                   abs=1e-5)


def test_statistics_of_two_workers_merge_to_those_of_their_pooled_data():
    SEEN.clear()
    workers = [RolloutWorker(f"{HERE}:CountEnv", num_envs_per_worker=2, rollout_fragment_length=5, seed=0,
                             env_config={"length": length}, actor_index=i + 1,
                             env_wrappers=[f"{HERE}:Record", "normalize"]) for i, length in enumerate((3, 4))]
    driver = Normalizer((2,))
    for _ in range(2):
        driver.merge_delta(SampleBatch.concat([w.sample() for w in workers]).normalize_delta)
    pooled = RunningMeanStd((2,))
    pooled.update(np.array(SEEN))
    merged = driver.shared["obs"]
    assert merged.count == pooled.count == len(SEEN) > 20
    np.testing.assert_allclose(merged.mean, pooled.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.var, pooled.var, rtol=1e-12)
    # Each worker normalized with what it had seen; given the driver's statistics with the weights
    # it uses them (and nothing is left to send twice).
    weights = {"normalize:" + k: v for k, v in driver.state_dict().items()}
    workers[0].set_weights({**workers[0].policy.get_weights(), **weights})
    assert workers[0].normalizer.current["obs"].count == pooled.count
    assert workers[0].normalizer.pop_delta()["obs"][0] == 0


def test_the_driver_merges_every_workers_statistics_and_sends_them_with_the_weights():
    config = {"train_batch_size": 64, "sgd_minibatch_size": 32, "num_sgd_iter": 1, "num_envs_per_worker": 2,
              "rollout_fragment_length": 16, "seed": 0, "env_wrappers": ["normalize"]}
    with flowrl.build("PPO", env="CartPole-v1", config=config) as algo:
        algo.train()
        algo.train()
        local = algo.workers.local_worker
        stats = local.normalizer.shared
        # Every observation of both sub-envs, from the first reset on, went from a batch into the
        # driver's statistics once; every reward but those of the autoreset steps.
        assert stats["obs"].count == 2 * (1 + local._num_steps)
        assert 128 <= stats["ret"].count < stats["obs"].count
        assert local.normalizer.pop_delta()["obs"][0] == 0  # nothing held back


@pytest.mark.parametrize("wrappers, expected", [(["normalize"], 0.9), ([{"normalize": {"gamma": 0.5}}], 0.5)])
def test_the_normalize_preset_scales_rewards_with_the_plans_gamma_unless_it_gives_one(wrappers, expected):
    config = {"gamma": 0.9, "train_batch_size": 64, "sgd_minibatch_size": 64, "num_envs_per_worker": 2,
              "rollout_fragment_length": 32,
              "env_wrappers": wrappers}
    with flowrl.build("PPO", env="CartPole-v1", config=config) as algo:
        assert algo.workers.local_worker.normalizer.gamma == expected


def test_remote_workers_statistics_merge_in_the_driver_and_come_back_with_the_weights(ray_session):
    config = {"train_batch_size": 64, "sgd_minibatch_size": 32, "num_sgd_iter": 1, "num_envs_per_worker": 2,
              "rollout_fragment_length": 16, "seed": 0, "num_workers": 2, "env_wrappers": ["normalize"]}
    with flowrl.build("PPO", env="CartPole-v1", config=config, executor="ray") as algo:
        for _ in range(3):
            algo.train()
        master = algo.workers.local_worker.normalizer.state_dict()
        remote = algo.workers.remote_workers.foreach("get_weights")
    # Each worker's 2 sub-envs give at least 16 observations a batch, and their first resets: the
    # driver holds both workers' (one worker's alone would be at most half of it).
    assert master["obs.count"] >= 2 * (3 * 2 * 16 + 2)
    for weights in remote:  # every worker got the merged statistics with the weights
        assert all(torch.equal(weights["normalize:" + k], v) for k, v in master.items())


# ---- normalize: checkpoints and evaluation ------------------------------------------------------------
SIGN_CONFIG = {"train_batch_size": 64, "sgd_minibatch_size": 64, "num_sgd_iter": 1, "num_envs_per_worker": 4,
               "rollout_fragment_length": 16, "seed": 0, "model": {"hidden": []},
               "env_wrappers": ["normalize"]}


def _act_on_the_sign(policy) -> None:
    """Hand-set weights: logits (-x, x) of the (normalized) observation x, so action 1 iff x > 0."""
    with torch.no_grad():
        linear = policy.model.pi[0]
        linear.weight.copy_(torch.tensor([[-100.0], [100.0]]))
        linear.bias.zero_()


def test_statistics_are_saved_restored_and_applied_frozen_by_eval_and_load_policy(tmp_path, capsys):
    with flowrl.build("PPO", env=f"{HERE}:SignEnv", config=SIGN_CONFIG) as algo:
        for _ in range(4):
            algo.train()
        _act_on_the_sign(algo.policy)
        saved = algo.save(tmp_path / "ckpt")
        stats = algo.workers.local_worker.normalizer.state_dict()
        seen = 4 * (1 + algo.workers.local_worker._num_steps)  # 4 sub-envs: a reset, then one per step
        assert algo.evaluate(episodes=20)["episode_return_mean"] == 1.0
        # The same policy on raw observations (1000 +- 1, all > 0) always acts 1: half right.
        raw = evaluate_policy(algo.policy, f"{HERE}:SignEnv", episodes=20)
        assert 0.2 < np.mean(raw) < 0.8
    assert (saved / "normalize.pt").is_file()
    assert stats["obs.count"] == seen and abs(float(stats["obs.mean"][0]) - 1000) < 0.2

    with flowrl.restore(saved) as algo:  # --resume goes through the same restore
        restored = algo.workers.local_worker.normalizer.state_dict()
        assert all(torch.equal(restored[k], v) for k, v in stats.items())
        algo.train()
        assert algo.workers.local_worker.normalizer.shared["obs"].count == seen + 4 * (
            1 + algo.workers.local_worker._num_steps)

    policy = flowrl.load_policy(saved)
    assert policy.evaluate(20) == [1.0] * 20
    obs = np.array([999.0], np.float32)
    assert policy.compute_action(obs) == 0 and policy.compute_action(np.array([1001.0], np.float32)) == 1
    assert run_cli(["eval", str(saved), "--episodes", "20"]) == 0
    assert "episode_return_mean 1.00" in capsys.readouterr().out


def test_a_checkpoint_without_its_statistics_says_so(tmp_path):
    with flowrl.build("PPO", env=f"{HERE}:SignEnv", config=SIGN_CONFIG) as algo:
        saved = algo.save(tmp_path / "ckpt")
    (saved / "normalize.pt").unlink()
    with pytest.raises(flowrl.ExperimentError, match=r"normalize.pt: missing from the checkpoint"):
        flowrl.load_policy(saved)
