"""Small envs for tests and benchmarks."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np


class SleepyCartPole(gym.Wrapper):
    """CartPole whose every step waits `sleep_s` (default 1 ms), like an env that waits on I/O."""

    def __init__(self, sleep_s: float = 0.001):
        super().__init__(gym.make("CartPole-v1"))
        self.sleep_s = sleep_s

    def step(self, action):
        time.sleep(self.sleep_s)
        return self.env.step(action)


class ConstantEnv(gym.Env):
    """One step per episode, observation 0, reward 1: the smallest valid env."""

    observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 1.0, True, False, {}


class FlakyCartPole(gym.Wrapper):
    """CartPole with a fault at its `fail_at_step`-th step, and every `fail_every` steps after
    that when given (steps counted over the life of this copy, across episodes). `fault`:
    "raise" (RuntimeError), "nan_obs" (NaN in the observation), "inf_reward", "wrong_shape"
    (an observation with one number too many), or "raise_on_reset" (every reset after the
    first `fail_at_step` steps raises). A copy made anew starts counting again.

    >>> env = FlakyCartPole(fail_at_step=2)
    >>> _ = env.reset(seed=0); _ = env.step(0)
    >>> env.step(0)
    Traceback (most recent call last):
    ...
    RuntimeError: FlakyCartPole fails at step 2
    """

    FAULTS = ("raise", "nan_obs", "inf_reward", "wrong_shape", "raise_on_reset")

    def __init__(self, fail_at_step: int = 10, fail_every: int | None = None, fault: str = "raise"):
        if fault not in self.FAULTS:
            raise ValueError(f"fault must be one of {', '.join(self.FAULTS)}, got {fault!r}")
        super().__init__(gym.make("CartPole-v1"))
        self.fail_at_step, self.fail_every, self.fault = fail_at_step, fail_every, fault
        self.steps = 0

    def _due(self) -> bool:
        if self.steps < self.fail_at_step:
            return False
        return self.steps == self.fail_at_step or bool(self.fail_every) and \
            (self.steps - self.fail_at_step) % self.fail_every == 0

    def reset(self, **kwargs):
        if self.fault == "raise_on_reset" and self.steps >= self.fail_at_step:
            raise RuntimeError(f"FlakyCartPole fails to reset after step {self.steps}")
        return self.env.reset(**kwargs)

    def step(self, action):
        self.steps += 1
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._due():
            if self.fault == "raise":
                raise RuntimeError(f"FlakyCartPole fails at step {self.steps}")
            if self.fault == "nan_obs":
                obs = np.full_like(obs, np.nan)
            elif self.fault == "inf_reward":
                reward = float("inf")
            elif self.fault == "wrong_shape":
                obs = np.append(obs, 0.0).astype(obs.dtype)
        return obs, reward, terminated, truncated, info
