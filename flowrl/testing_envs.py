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
