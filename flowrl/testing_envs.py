"""Small envs for tests and benchmarks."""

from __future__ import annotations

import math
import time
from typing import Any

import gymnasium as gym
import numpy as np

from flowrl.multi_agent_env import MultiAgentEnv


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


class MultiAgentCartPole(MultiAgentEnv):
    """`num_agents` independent CartPole-v1 poles, agents "agent_0", "agent_1", ...: each agent
    leaves when its own pole falls (terminated) or after 500 steps (truncated), and the episode
    ends when every agent has left. It repeats the arithmetic of gymnasium's CartPoleEnv, with
    its constants, on Python floats (for a few poles faster than numpy arrays, whose every
    operation costs a microsecond): for a seed s, agent i's pole starts and moves exactly as
    CartPole-v1 reset with seed num_agents * s + i, so that the copies a worker seeds s, s + 1,
    ... share no pole's seed.

    >>> env = MultiAgentCartPole(num_agents=2)
    >>> obs, _ = env.reset(seed=0)
    >>> obs, rewards, terminations, truncations, _ = env.step({"agent_0": 1, "agent_1": 0})
    >>> sorted(obs), rewards, terminations
    (['agent_0', 'agent_1'], {'agent_0': 1.0, 'agent_1': 1.0}, {'agent_0': False, 'agent_1': False})
    """

    def __init__(self, num_agents: int = 4, max_episode_steps: int = 500):
        from gymnasium.envs.classic_control.cartpole import CartPoleEnv

        if num_agents < 1:
            raise ValueError(f"num_agents must be at least 1, got {num_agents}")
        self.possible_agents = [f"agent_{i}" for i in range(num_agents)]
        self.agents: list[str] = []
        self.max_episode_steps = max_episode_steps
        self._pole = CartPoleEnv()  # its spaces and constants
        self._rngs = [gym.utils.seeding.np_random()[0] for _ in range(num_agents)]
        self._state: dict[str, tuple[float, float, float, float]] = {}
        self._t = 0

    def observation_space(self, agent: str) -> gym.Space:
        return self._pole.observation_space

    def action_space(self, agent: str) -> gym.Space:
        return self._pole.action_space

    def reset(self, seed: int | None = None):
        if seed is not None:
            n = len(self.possible_agents)
            self._rngs = [gym.utils.seeding.np_random(n * seed + i)[0] for i in range(n)]
        self._state = {a: tuple(rng.uniform(-0.05, 0.05, size=(4,)).tolist())
                       for a, rng in zip(self.possible_agents, self._rngs)}
        self.agents = list(self.possible_agents)
        self._t = 0
        return self._observations(self._state), {a: {} for a in self.agents}

    @staticmethod
    def _observations(states: dict[str, tuple]) -> dict[str, np.ndarray]:
        """{agent: float32 observation}: rows of one array (one numpy call for all poles)."""
        return dict(zip(states, np.array(list(states.values()), np.float32)))

    def step(self, actions: dict[str, int]):
        if not self.agents:
            raise RuntimeError("MultiAgentCartPole.step after the episode ended: call reset")
        p = self._pole
        # The constants as locals: an attribute lookup per use costs more than the arithmetic.
        force_mag, gravity, tau, length = p.force_mag, p.gravity, p.tau, p.length
        masspole, total_mass, polemass_length = p.masspole, p.total_mass, p.polemass_length
        x_limit, theta_limit = p.x_threshold, p.theta_threshold_radians
        self._t += 1
        truncated = self._t >= self.max_episode_steps  # as gymnasium's TimeLimit: also when terminated
        states, terminations, live = {}, {}, []
        for agent in self.agents:
            action = actions.get(agent)
            if action != 0 and action != 1:
                raise ValueError(f"agent {agent!r}: a CartPole action is 0 or 1, got {action!r}")
            x, x_dot, theta, theta_dot = self._state[agent]
            force = force_mag if action == 1 else -force_mag
            costheta, sintheta = math.cos(theta), math.sin(theta)  # the grouping below is gymnasium's: equal bits
            temp = (force + polemass_length * (theta_dot * theta_dot) * sintheta) / total_mass
            thetaacc = (gravity * sintheta - costheta * temp) / (
                length * (4.0 / 3.0 - masspole * (costheta * costheta) / total_mass))
            xacc = temp - polemass_length * thetaacc * costheta / total_mass
            x, x_dot = x + tau * x_dot, x_dot + tau * xacc
            theta, theta_dot = theta + tau * theta_dot, theta_dot + tau * thetaacc
            states[agent] = (x, x_dot, theta, theta_dot)
            terminations[agent] = terminated = x < -x_limit or x > x_limit or theta < -theta_limit or theta > theta_limit
            if not (terminated or truncated):
                live.append(agent)
        self._state.update(states)
        rewards = dict.fromkeys(self.agents, 1.0)
        truncations = dict.fromkeys(self.agents, truncated)
        infos = {a: {} for a in self.agents}
        self.agents = live
        return self._observations(states), rewards, terminations, truncations, infos


def multi_agent_cartpole(num_agents: int = 4, max_episode_steps: int = 500) -> MultiAgentCartPole:
    """env "flowrl.testing_envs:multi_agent_cartpole": see MultiAgentCartPole."""
    return MultiAgentCartPole(num_agents, max_episode_steps)


class MultiAgentPendulum(MultiAgentEnv):
    """`num_agents` independent Pendulum-v1s, agents "agent_0", ...: continuous actions (for
    multi-agent SAC); every agent is truncated together after 200 steps, as Pendulum-v1 is."""

    def __init__(self, num_agents: int = 2):
        self.possible_agents = [f"agent_{i}" for i in range(num_agents)]
        self.agents: list[str] = []
        self._envs = {a: gym.make("Pendulum-v1") for a in self.possible_agents}

    def observation_space(self, agent: str) -> gym.Space:
        return self._envs[agent].observation_space

    def action_space(self, agent: str) -> gym.Space:
        return self._envs[agent].action_space

    def reset(self, seed: int | None = None):
        self.agents = list(self.possible_agents)
        n = len(self.agents)
        obs = {a: e.reset(seed=None if seed is None else n * seed + i)[0] for i, (a, e) in enumerate(self._envs.items())}
        return obs, {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]):
        out = {a: self._envs[a].step(actions[a]) for a in self.agents}
        obs, rewards = {a: o[0] for a, o in out.items()}, {a: float(o[1]) for a, o in out.items()}
        terminations, truncations = {a: o[2] for a, o in out.items()}, {a: o[3] for a, o in out.items()}
        self.agents = [a for a in out if not (terminations[a] or truncations[a])]
        return obs, rewards, terminations, truncations, {a: {} for a in out}

    def close(self) -> None:
        for e in self._envs.values():
            e.close()


def multi_agent_pendulum(num_agents: int = 2) -> MultiAgentPendulum:
    """env "flowrl.testing_envs:multi_agent_pendulum": see MultiAgentPendulum."""
    return MultiAgentPendulum(num_agents)


class ScriptedMultiAgentEnv(MultiAgentEnv):
    """A 4-step episode whose every number can be worked out by hand, for tests of multi-agent
    workers: three agents with different spaces, one that leaves early, one that joins later.

    - "walker": observation Box (2,) = [t, its last action], actions Discrete(3), reward = its
      action; acts on steps 1-4 and is truncated on step 4 (the time limit).
    - "flyer": observation Box (3,) = [t, its last action], actions Box(-1, 1, (2,)), reward
      0.5 a step; acts on steps 1-2 and terminates on step 2 (it leaves early).
    - "late": observation Box (1,) = [t], actions Discrete(2), reward = 10 * its action; first
      appears in the observations of step 2 (it joins), acts on steps 3-4, terminates on step 4.

    t is the number of env steps taken. Env steps: 4; agent steps: 4 + 2 + 2 = 8.
    """

    possible_agents = ["walker", "flyer", "late"]
    LENGTH, FLYER_LEAVES, LATE_JOINS = 4, 2, 2
    _spaces = {
        "walker": (gym.spaces.Box(-np.inf, np.inf, (2,), np.float32), gym.spaces.Discrete(3)),
        "flyer": (gym.spaces.Box(-np.inf, np.inf, (3,), np.float32), gym.spaces.Box(-1, 1, (2,), np.float32)),
        "late": (gym.spaces.Box(-np.inf, np.inf, (1,), np.float32), gym.spaces.Discrete(2)),
    }

    def __init__(self):
        self.agents: list[str] = []
        self._t = 0

    def observation_space(self, agent: str) -> gym.Space:
        return self._spaces[agent][0]

    def action_space(self, agent: str) -> gym.Space:
        return self._spaces[agent][1]

    def _obs(self, agent: str, action: Any = None) -> np.ndarray:
        if agent == "late":
            return np.array([self._t], np.float32)
        size = self._spaces[agent][0].shape[0] - 1
        last = np.zeros(size, np.float32) if action is None else np.atleast_1d(np.asarray(action, np.float32))
        return np.concatenate([[self._t], last]).astype(np.float32)

    def reset(self, seed: int | None = None):
        self._t = 0
        self.agents = ["walker", "flyer"]
        return {a: self._obs(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]):
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"no action for agents {missing}")
        self._t += 1
        t = self._t
        rewards = {"walker": float(actions["walker"]), "flyer": 0.5, "late": 10.0 * float(actions.get("late", 0))}
        rewards = {a: r for a, r in rewards.items() if a in self.agents}
        obs = {a: self._obs(a, actions[a]) for a in self.agents}
        terminations = dict.fromkeys(self.agents, False)
        truncations = dict.fromkeys(self.agents, False)
        if t == self.FLYER_LEAVES:
            terminations["flyer"] = True
        if t == self.LATE_JOINS:
            obs["late"], terminations["late"], truncations["late"] = self._obs("late"), False, False
        if t == self.LENGTH:
            truncations["walker"] = True
            terminations["late"] = True
        self.agents = [a for a in obs if not (terminations[a] or truncations[a])]
        return obs, rewards, terminations, truncations, {a: {} for a in obs}
