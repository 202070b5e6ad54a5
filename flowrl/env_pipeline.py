"""`env_wrappers`: what is done to each env between the simulator and the policy.

A plan file's `config.env_wrappers` is a list in RL-Zoo's `env_wrapper` shape. Each item is a
gymnasium wrapper by class path ("gymnasium.wrappers.TimeLimit" or "pkg.mod:Class"), alone or
mapped to its keyword arguments, or one of two presets:

- `atari`: gymnasium's AtariPreprocessing for ALE v5 ids (no-op reset, 84x84 grayscale,
  optional terminal on life loss; the frame skip is the v5 env's own, or the wrapper's when the
  env is made with frameskip 1, never both), a stack of 4 frames as uint8 (84x84x4), and rewards
  clipped to their sign for training.
- `normalize`: observations and rewards normalized with statistics merged across all rollout
  workers (flowrl.normalize); it comes last.

    env_wrappers:
      - gymnasium.wrappers.TimeLimit: {max_episode_steps: 200}
      - normalize

Wrappers apply to each sub-env in the order given; clipping and normalizing apply to the vector
env as a whole (`TrainingTransform`). Episode returns are always those of the raw rewards.
Rollout workers, evaluation, `flowrl eval` and `flowrl.load_policy` all make their envs through
`EnvPipeline`, so a trained policy sees what it saw in training (with the statistics frozen).
"""

from __future__ import annotations

import importlib
import inspect
from collections import deque
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from flowrl.config import ConfigError, _check_type, suggest
from flowrl.normalize import Normalizer

PRESETS = ("atari", "normalize")
_PRESET_OPTIONS = {"atari": {"noop_max": 30, "terminal_on_life_loss": False, "frame_stack": 4, "fire_reset": True},
                   "normalize": {"gamma": 0.99}}  # the discount of the return that scales rewards


def with_plan_gamma(items: list | None, gamma: float) -> list:
    """`env_wrappers` with the normalize preset's `gamma` set to the plan's where it gives none
    (as RL-Zoo gives VecNormalize the algorithm's gamma): rewards are scaled by the spread of the
    return the agent discounts. Items that are not well formed are left for `EnvPipeline.parse`.

    >>> with_plan_gamma(["normalize"], 0.9), with_plan_gamma([{"normalize": {"gamma": 0.5}}], 0.9)
    ([{'normalize': {'gamma': 0.9}}], [{'normalize': {'gamma': 0.5}}])
    """
    out = []
    for item in items or []:
        if item == "normalize":
            item = {"normalize": None}
        if isinstance(item, dict) and len(item) == 1 and isinstance(item.get("normalize", ()), (dict, type(None))) \
                and "gamma" not in (item["normalize"] or {}):
            item = {"normalize": {**(item["normalize"] or {}), "gamma": float(gamma)}}
        out.append(item)
    return out


def load_wrapper_class(path: str, key: str) -> type:
    """The class "pkg.mod:Class" or "pkg.mod.Class" names; ConfigError naming `key` if none."""
    module_name, sep, name = path.partition(":")
    if not sep:
        module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise ConfigError(key, f"{path!r} is neither a preset ({', '.join(PRESETS)}) nor a class path "
                               "such as gymnasium.wrappers.TimeLimit or my_pkg.wrappers:MyWrapper")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(key, f"cannot load wrapper {path!r} ({e})") from None
    if not callable(cls):
        raise ConfigError(key, f"{path!r} is not a class")
    return cls


def check_kwargs(wrapper: type, kwargs: dict, key: str) -> None:
    """ConfigError naming `key` when `kwargs` do not fit the wrapper's signature (after the env)."""
    try:
        signature = inspect.signature(wrapper)
    except ValueError:
        return  # no signature to check (a builtin): the env is made with them, or says why
    params = list(signature.parameters.values())[1:]  # after the env
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        for name in kwargs:
            if name not in names:
                raise ConfigError(f"{key}.{name}", "unknown keyword argument" + suggest(str(name), names))
    try:
        signature.bind(None, **kwargs)  # None stands for the env
    except TypeError as e:
        raise ConfigError(key, f"bad keyword arguments ({e})") from None


@dataclass(frozen=True)
class EnvPipeline:
    """The parsed `env_wrappers`: per-sub-env wrappers (class path, kwargs) in order, then
    whether training rewards are clipped and how observations and rewards are normalized."""

    wrappers: tuple[tuple[str, dict], ...] = ()
    atari: dict | None = None      # the atari preset's options
    normalize: dict | None = None  # the normalize preset's options

    @classmethod
    def parse(cls, items: list | None, key: str = "env_wrappers") -> "EnvPipeline":
        """Check a config's `env_wrappers` (classes load, keyword arguments fit their signature)."""
        wrappers, atari, normalize = [], None, None
        for i, item in enumerate(items or []):
            where = f"{key}[{i}]"
            if isinstance(item, dict) and len(item) == 1:
                (name, kwargs), = item.items()
            elif isinstance(item, str):
                name, kwargs = item, {}
            else:
                raise ConfigError(where, f"expected a class path or {{class path: {{kwargs}}}}, got {item!r}")
            kwargs = {} if kwargs is None else kwargs
            if not isinstance(name, str) or not isinstance(kwargs, dict):
                raise ConfigError(where, f"expected a class path mapped to its keyword arguments, got {item!r}")
            if normalize is not None:
                raise ConfigError(where, "normalize must come last: it normalizes what the other wrappers give")
            if name in PRESETS:
                options = _PRESET_OPTIONS[name]
                unknown = sorted(set(kwargs) - set(options))
                if unknown:
                    raise ConfigError(f"{where}.{name}.{unknown[0]}", f"unknown option of the {name} preset; it "
                                                                      f"takes {', '.join(options)}")
                kwargs = {k: _check_type(f"{where}.{name}.{k}", v, type(options[k])) for k, v in kwargs.items()}
                if not 0 <= kwargs.get("gamma", 0) <= 1 or kwargs.get("noop_max", 0) < 0 \
                        or kwargs.get("frame_stack", 1) < 1:
                    raise ConfigError(f"{where}.{name}", f"out of range: {kwargs} (gamma in [0, 1], noop_max >= 0, "
                                                         "frame_stack >= 1)")
                if name == "atari":
                    if atari is not None or wrappers:
                        raise ConfigError(where, "atari must come first, once: it preprocesses the ALE env itself")
                    atari = {**options, **kwargs}
                else:
                    normalize = {**options, **kwargs}
                continue
            check_kwargs(load_wrapper_class(name, where), kwargs, f"{where}.{name}")
            wrappers.append((name, dict(kwargs)))
        return cls(tuple(wrappers), atari, normalize)

    def wrap(self, env: gym.Env) -> gym.Env:
        """One sub-env with the atari preprocessing and the wrappers, in order."""
        if self.atari is not None:
            env = atari_preprocessing(env, **self.atari)
        for i, (name, kwargs) in enumerate(self.wrappers):
            env = load_wrapper_class(name, f"env_wrappers[{i}]")(env, **kwargs)
        return env

    def transform(self, vector_env: gym.vector.VectorEnv) -> gym.vector.VectorEnv:
        """The vector env with training rewards clipped and normalized when the presets say so
        (with fresh statistics: its `normalizer`)."""
        if self.atari is None and self.normalize is None:
            return vector_env
        return TrainingTransform(vector_env, self.atari is not None,
                                 self.make_normalizer(vector_env.single_observation_space))

    def make_normalizer(self, space: gym.Space) -> Normalizer | None:
        """Fresh statistics for observations of `space` (None without the normalize preset)."""
        if self.normalize is None:
            return None
        if not isinstance(space, gym.spaces.Box):
            raise ConfigError("env_wrappers", f"normalize needs a Box observation space, got {space}")
        return Normalizer(space.shape, gamma=self.normalize["gamma"])


def atari_preprocessing(env: gym.Env, noop_max: int = 30, terminal_on_life_loss: bool = False,
                        frame_stack: int = 4, fire_reset: bool = True) -> gym.Env:
    """gymnasium's AtariPreprocessing (84x84 grayscale, uint8) and `frame_stack` frames. The
    frames are skipped by the ALE v5 env (frameskip 4); made with frameskip 1, the wrapper skips
    4 and max-pools the last two, as in DQN. Note that gymnasium's terminal_on_life_loss resets
    the whole game at each lost life, and episodes are then lives. With `fire_reset`, games
    that wait for FIRE to start (Breakout) get it at each reset (FireReset)."""
    try:
        import cv2  # noqa: F401  (AtariPreprocessing resizes with it)
        from ale_py.env import AtariEnv
    except ImportError as e:
        raise ConfigError("env_wrappers", f"the atari preset needs {e.name} (pip install 'flowrl[atari]')") from None
    if not isinstance(env.unwrapped, AtariEnv):
        raise ConfigError("env_wrappers", f"atari preprocesses ALE envs (ALE/...-v5), not {env.spec and env.spec.id}")
    frameskip = env.unwrapped._frameskip
    if not isinstance(frameskip, int):
        raise ConfigError("env_wrappers", f"atari: the env's frameskip {frameskip} is random; give env_config "
                                          "frameskip 4 (or 1, to skip in the wrapper)")
    env = gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=4 if frameskip == 1 else 1,
                                          screen_size=84, terminal_on_life_loss=terminal_on_life_loss,
                                          grayscale_obs=True, scale_obs=False)
    if fire_reset and "FIRE" in env.unwrapped.get_action_meanings():
        env = FireReset(env)
    return FrameStack(env, frame_stack)


class FireReset(gym.Wrapper):
    """Presses FIRE, then the action after it, at each reset, as the DQN-era Atari wrappers do
    (SB3's FireResetEnv): games such as Breakout wait for FIRE before the ball comes, and an agent
    that has not learnt to press it sees nothing happen. The two steps' rewards are not counted."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        meanings = env.unwrapped.get_action_meanings()
        self.fire = meanings.index("FIRE")
        self.after = 2 if len(meanings) >= 3 else 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        for action in (self.fire, self.after):
            obs, _, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                obs, info = self.env.reset(options=options)
        return obs, info


class FrameStack(gym.ObservationWrapper):
    """The last `num_stack` HxW frames as one HxWxN array of the frames' dtype (channels last,
    as the CNN takes them); a reset fills the stack with its first frame."""

    def __init__(self, env: gym.Env, num_stack: int = 4):
        super().__init__(env)
        space = env.observation_space
        self.num_stack = num_stack
        self.observation_space = gym.spaces.Box(np.repeat(space.low[..., None], num_stack, -1),
                                                np.repeat(space.high[..., None], num_stack, -1), dtype=space.dtype)
        self.frames: deque = deque(maxlen=num_stack)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.frames.extend([obs] * self.num_stack)
        return np.stack(self.frames, axis=-1), info

    def observation(self, observation: np.ndarray) -> np.ndarray:
        self.frames.append(observation)
        return np.stack(self.frames, axis=-1)


class TrainingTransform(gym.vector.VectorWrapper):
    """Rewards for training (clipped to their sign with `clip_rewards`, then divided by the
    return's standard deviation with a `normalizer`) and normalized observations. The raw
    rewards of the last step stay in `raw_rewards`: rollout workers report episode returns
    from them."""

    def __init__(self, env: gym.vector.VectorEnv, clip_rewards: bool, normalizer: Normalizer | None):
        super().__init__(env)
        self.clip_rewards, self.normalizer = clip_rewards, normalizer
        self.raw_rewards = np.zeros(env.num_envs)
        self._returns = np.zeros(env.num_envs)             # discounted, of each sub-env's episode
        self._autoreset = np.zeros(env.num_envs, dtype=bool)  # the next step is a reset, not a transition
        if normalizer is not None:
            shape = env.single_observation_space.shape
            self.single_observation_space = gym.spaces.Box(-normalizer.clip, normalizer.clip, shape, np.float32)
            self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, env.num_envs)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._returns[:] = 0.0
        self._autoreset[:] = False
        return (obs if self.normalizer is None else self.normalizer.observations(obs)), info

    def step(self, actions):
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        self.raw_rewards = rewards
        train = np.sign(rewards) if self.clip_rewards else rewards
        if self.normalizer is not None:
            counted = ~self._autoreset
            self._returns = np.where(counted, self._returns * self.normalizer.gamma + train, 0.0)
            train = self.normalizer.rewards(train, self._returns, counted)
            obs = self.normalizer.observations(obs)
        self._autoreset = terminated | truncated
        return obs, train, terminated, truncated, info


def frozen_observations(normalizer: Normalizer | None, obs: Any) -> Any:
    """Observations as a trained policy saw them: normalized with frozen statistics (evaluation)."""
    return obs if normalizer is None else normalizer.observations(obs, update=False)
