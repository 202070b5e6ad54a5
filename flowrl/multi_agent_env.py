"""Multi-agent envs: one interface over PettingZoo's parallel and turn-based (AEC) envs.

An env is given as "package.module:factory" (env_config is passed to the factory) that returns
a PettingZoo `ParallelEnv`, a PettingZoo `AECEnv` or a flowrl `MultiAgentEnv`. Every step takes
the actions of the agents that must act and gives dicts keyed by agent:

- `obs`: the agents that must act next, plus those that terminate or are truncated on this step
  (their final observation, from which a truncated agent bootstraps);
- `rewards`: every agent that received a reward on this step, also one that did not act (in a
  turn-based game the loser's -1 arrives on the winner's move); a worker credits the rewards an
  agent receives between two of its actions to the first;
- `terminations`, `truncations`: at least every agent in `obs`.

The episode is over when no agent remains to act (every agent in `obs` is done). Agents may have
different spaces, leave early, and join later (they first appear in `obs`).

Action masks: where an agent's observation is a dict of "observation" and "action_mask"
(PettingZoo's classic games), the agent's observation is the "observation" part, and the mask
goes to `infos[agent]["action_mask"]`. flowrl's policies do not read the mask: one may pick an
illegal move, and the game then ends with PettingZoo's penalty for it (tictactoe: -1 for that
player, 0 for the other, both terminated), which is how it learns the rules; PettingZoo's
warning about it is not printed.

>>> env = make_multi_agent_env("pettingzoo.classic.tictactoe_v3:env")
>>> obs, infos = env.reset(seed=0)
>>> list(obs), obs["player_1"].shape, infos["player_1"]["action_mask"].tolist()
(['player_1'], (3, 3, 2), [1, 1, 1, 1, 1, 1, 1, 1, 1])
>>> obs, rewards, terminations, truncations, infos = env.step({"player_1": 4})
>>> list(obs), terminations
(['player_2'], {'player_2': False})
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from flowrl.envs import EnvError, _load_entry_point, check_env_id, describe_error, make_env


class MultiAgentEnv:
    """The interface flowrl's multi-agent worker steps (PettingZoo's ParallelEnv, with a reset
    that returns the observations of the agents to act). Subclass it for an env of your own."""

    possible_agents: list[str]  # every agent that may appear, in a fixed order
    agents: list[str]           # the agents in the episode now, not yet done

    def observation_space(self, agent: str) -> gym.Space:
        raise NotImplementedError

    def action_space(self, agent: str) -> gym.Space:
        raise NotImplementedError

    def reset(self, seed: int | None = None) -> tuple[dict[str, Any], dict[str, dict]]:
        raise NotImplementedError

    def step(self, actions: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float], dict[str, bool],
                                                      dict[str, bool], dict[str, dict]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _pettingzoo_kind(made: Any) -> str | None:
    """"parallel", "aec" or None (not a PettingZoo env, or PettingZoo is not installed)."""
    try:
        from pettingzoo import AECEnv, ParallelEnv
    except ImportError:
        return None
    if isinstance(made, ParallelEnv):
        return "parallel"
    if isinstance(made, AECEnv):
        return "aec"
    return None


def _is_multi_agent_class(factory: Any) -> bool | None:
    """True/False when the factory is a class that tells; None for a function (it must be called)."""
    if not isinstance(factory, type):
        return None
    if issubclass(factory, MultiAgentEnv):
        return True
    if issubclass(factory, gym.Env):
        return False
    try:
        from pettingzoo import AECEnv, ParallelEnv
    except ImportError:
        return None
    return True if issubclass(factory, (AECEnv, ParallelEnv)) else None


def _make(env: str, env_config: dict | None) -> Any:
    """What the entry point `env` returns for `env_config`; EnvError naming `env` if it raises."""
    try:
        return make_env(env, env_config)
    except EnvError:
        raise
    except Exception as e:
        raise EnvError(f"env {env!r}: its factory raised {describe_error(e)}") from None


def _kind(env: str, made: Any) -> str:
    """"flowrl", "parallel", "aec" or "gymnasium": what the factory of `env` made."""
    if isinstance(made, MultiAgentEnv):
        return "flowrl"
    kind = _pettingzoo_kind(made)
    if kind is not None:
        return kind
    if isinstance(made, gym.Env):
        return "gymnasium"
    raise EnvError(f"env {env!r}: its factory returned a {type(made).__name__}, not a gymnasium Env, a PettingZoo "
                   "ParallelEnv or AECEnv or a flowrl MultiAgentEnv")


def is_multi_agent_env(env: str, env_config: dict | None = None) -> bool:
    """Whether `env` is a multi-agent env: a "package.module:factory" that returns a PettingZoo
    ParallelEnv or AECEnv, or a flowrl MultiAgentEnv. A registered gymnasium id or an entry point
    that is a class is told without making it; a factory function is called once.

    >>> is_multi_agent_env("CartPole-v1"), is_multi_agent_env("flowrl.testing_envs:multi_agent_cartpole")
    (False, True)
    """
    check_env_id(env)
    if ":" not in env or env in gym.envs.registry:
        return False
    known = _is_multi_agent_class(_load_entry_point(env))
    if known is not None:
        return known
    made = _make(env, env_config)
    kind = _kind(env, made)
    made.close()
    return kind != "gymnasium"


def make_multi_agent_env(env: str, env_config: dict | None = None) -> MultiAgentEnv:
    """The multi-agent env "package.module:factory" makes with `env_config`, as a MultiAgentEnv
    (PettingZoo envs adapted). EnvError naming `env` when it is not a multi-agent env."""
    single = EnvError(f"env {env!r} is a gymnasium env, not a multi-agent env: give a \"package.module:factory\" "
                      "that returns a PettingZoo env or a flowrl MultiAgentEnv")
    if ":" not in env or env in gym.envs.registry:
        check_env_id(env)
        raise single
    made = _make(env, env_config)
    kind = _kind(env, made)
    if kind == "gymnasium":
        made.close()
        raise single
    return made if kind == "flowrl" else ParallelEnvAdapter(made) if kind == "parallel" else AECEnvAdapter(made)


def _is_masked(space: gym.Space) -> bool:
    """Whether `space` is PettingZoo's {"observation": ..., "action_mask": ...}."""
    return isinstance(space, gym.spaces.Dict) and set(space.spaces) == {"observation", "action_mask"}


class _PettingZooAdapter(MultiAgentEnv):
    """What the two adapters share: spaces (masked observations unpacked) and the env's agents."""

    def __init__(self, env: Any):
        from pettingzoo.utils.env_logger import EnvLogger

        self.env = env
        self.possible_agents = list(env.possible_agents)
        self._masked = {a: _is_masked(env.observation_space(a)) for a in self.possible_agents}
        self._logger = EnvLogger

    def _step(self, actions: Any) -> Any:
        """The env's step, with PettingZoo's warnings neither printed nor kept: an illegal move
        is a game lost, as the module says, not news on every step of a run, and PettingZoo's
        EnvLogger keeps every message in a list that grows for the life of the process."""
        output, self._logger._output = self._logger._output, False
        try:
            return self.env.step(actions)
        finally:
            self._logger._output = output
            self._logger.mqueue.clear()

    def observation_space(self, agent: str) -> gym.Space:
        space = self.env.observation_space(agent)
        return space["observation"] if self._masked.get(agent) else space

    def action_space(self, agent: str) -> gym.Space:
        return self.env.action_space(agent)

    def _unpack(self, agent: str, obs: Any, info: dict) -> tuple[Any, dict]:
        """The observation without its action mask, and the info with it."""
        if agent not in self._masked:  # an agent that was not in possible_agents
            self._masked[agent] = _is_masked(self.env.observation_space(agent))
        if not self._masked[agent]:
            return obs, info
        return obs["observation"], {**info, "action_mask": obs["action_mask"]}

    def close(self) -> None:
        self.env.close()


class ParallelEnvAdapter(_PettingZooAdapter):
    """A PettingZoo ParallelEnv: every live agent acts on every step. Its step already gives the
    final observation of the agents that are done."""

    @property
    def agents(self) -> list[str]:
        return list(self.env.agents)

    def reset(self, seed: int | None = None) -> tuple[dict[str, Any], dict[str, dict]]:
        obs, infos = self.env.reset(seed=seed)
        return self._unpack_all(obs, infos)

    def step(self, actions: dict[str, Any]):
        obs, rewards, terminations, truncations, infos = self._step(actions)
        obs, infos = self._unpack_all(obs, infos)
        return (obs, {a: float(r) for a, r in rewards.items()}, {a: bool(d) for a, d in terminations.items()},
                {a: bool(d) for a, d in truncations.items()}, infos)

    def _unpack_all(self, obs: dict, infos: dict) -> tuple[dict[str, Any], dict[str, dict]]:
        unpacked = {a: self._unpack(a, o, infos.get(a, {})) for a, o in obs.items()}
        return {a: o for a, (o, _) in unpacked.items()}, {a: i for a, (_, i) in unpacked.items()}


class AECEnvAdapter(_PettingZooAdapter):
    """A PettingZoo AECEnv (turn-based): `obs` holds only the agent whose turn it is, plus the
    agents that became done on this step. PettingZoo's convention that a done agent must still
    be stepped with None before it leaves is followed here, out of the caller's sight; the
    rewards of every env step taken (the instantaneous `rewards` of PettingZoo, summed as its
    aec_to_parallel does) are reported, so an agent that did not act gets them too."""

    def __init__(self, env: Any):
        super().__init__(env)
        self._reported: set[str] = set()  # agents whose end was given to the caller

    @property
    def agents(self) -> list[str]:
        env = self.env
        return [a for a in env.agents if not (env.terminations[a] or env.truncations[a])]

    def reset(self, seed: int | None = None) -> tuple[dict[str, Any], dict[str, dict]]:
        self.env.reset(seed=seed)
        self._reported = set()
        obs, _, _, _, infos = self._advance({})
        return obs, infos

    def step(self, actions: dict[str, Any]):
        env = self.env
        agent = env.agent_selection
        if agent not in actions:
            raise ValueError(f"agent {agent!r} is to act, but the actions are for {sorted(actions)}")
        self._step(actions[agent])
        return self._advance(dict(env.rewards))

    def _advance(self, rewards: dict[str, float]):
        """Report the agents that became done and step them with None, until an agent that must
        act is selected or none is left; then add it to `obs`."""
        env = self.env
        obs, terminations, truncations, infos = {}, {}, {}, {}

        def report(agent: str) -> None:
            obs[agent], infos[agent] = self._unpack(agent, env.observe(agent), env.infos.get(agent, {}))
            terminations[agent] = bool(env.terminations[agent])
            truncations[agent] = bool(env.truncations[agent])

        while True:
            for agent in env.agents:
                if agent not in self._reported and (env.terminations[agent] or env.truncations[agent]):
                    report(agent)
                    self._reported.add(agent)
            if not env.agents:
                break
            selected = env.agent_selection
            if not (env.terminations[selected] or env.truncations[selected]):
                report(selected)
                break
            self._step(None)
            for a, r in env.rewards.items():
                rewards[a] = rewards.get(a, 0.0) + r
        return obs, {a: float(r) for a, r in rewards.items()}, terminations, truncations, infos
