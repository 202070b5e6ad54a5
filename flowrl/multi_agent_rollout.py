"""The multi-agent rollout worker: several copies of a multi-agent env, a policy per policy id.

Each `sample()` steps every env copy `rollout_fragment_length` times and returns a
MultiAgentBatch. Per step, the observations of all agents that must act, in all copies, are
grouped by policy: one policy call per policy. A row is one agent's transition: its observation,
its action, the rewards it received from that action until it next acts or leaves (turn-based
envs give rewards to agents that did not act), and the observation it then has. A transition
closes when the agent next must act or when it terminates or is truncated; one still open (a
turn-based agent waiting for its turn) is carried into the next call.

next_vf_preds is V(new_obs) under the weights that sampled the batch, 0 where the agent
terminated: a truncated agent bootstraps from its last observation, one that terminated does
not. An agent that leaves early ends its trajectory there; the episode ends when no agent is
left to act, and an agent still waiting then is truncated. Rows are laid out trajectory by
trajectory (episode, agent, t); `agent_id` is the agent's index in the env's possible_agents.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from flowrl.config import ConfigError
from flowrl.envs import EnvFaultError, describe_error
from flowrl.multi_agent import MultiAgentSetup, checked_mapping, first_agents, parse_multiagent, policy_class_of
from flowrl.multi_agent_batch import MultiAgentBatch
from flowrl.policy import make_policy, obs_to_array
from flowrl.policy_stack import PolicyStack, stacks
from flowrl.rollout import _stack_obs, worker_seed
from flowrl.sample_batch import SampleBatch

# A row as _act opens it (the first nine) and _step closes it (the last three).
_ROW_FIELDS = ("obs", "actions", "rewards", "action_logp", "vf_preds", "t", "weights_version", "eps_id", "agent_id",
               "new_obs", "terminateds", "truncateds")
_COLUMN_ORDER = ("obs", "new_obs", "actions", "rewards", "terminateds", "truncateds", "eps_id", "t", "action_logp",
                 "vf_preds", "weights_version", "agent_id")


def _action_dtype(space: gym.Space) -> np.dtype:
    """The dtype of the `actions` column, as the policy samples them."""
    return np.dtype(np.float32) if isinstance(space, gym.spaces.Box) else np.dtype(np.int64)


def _batch_obs(space: gym.Space, items: list) -> np.ndarray:
    """Observations of single agents as one array, as policies take them (one numpy call for Box)."""
    if isinstance(space, gym.spaces.Box):
        return np.asarray(items, dtype=space.dtype)
    return obs_to_array(space, _stack_obs(space, items))


def _rows(actions: np.ndarray) -> list:
    """One action per row: ints for Discrete, arrays otherwise."""
    return actions.tolist() if actions.ndim == 1 else list(actions)


class _Episode:
    """One env copy's episode in progress."""

    def __init__(self, eps_id: int):
        self.eps_id = eps_id
        self.length = 0                      # env steps
        self.team_return = 0.0
        self.returns: dict[str, float] = {}  # per agent
        self.t: dict[str, int] = {}          # per agent: its transitions so far
        self.policy: dict[str, str] = {}     # per agent, fixed for the episode
        self.open: dict[str, list] = {}      # per agent: the transition waiting for its end


class MultiAgentRolloutWorker:
    """Owns `num_envs_per_worker` copies of a multi-agent env and a TorchPolicy (or the plan's
    policy class, or that of the policy's own `plan`) per policy id. Takes the keyword arguments
    of RolloutWorker, plus `multiagent` (the config section, flowrl.multi_agent) and
    `count_steps_by`; `policies` (policy objects to act with instead of new ones) and
    `explore=False` (the most likely actions) are for evaluating trained policies."""

    def __init__(self, env: str, multiagent: dict, count_steps_by: str = "env_steps", num_envs_per_worker: int = 1,
                 rollout_fragment_length: int = 200, env_config: dict[str, Any] | None = None,
                 model: dict[str, Any] | None = None, seed: int | None = None, lr: float = 3e-4,
                 actor_index: int = 0, sample: bool = True, num_threads: int | None = 1,
                 policy: str = "TorchPolicy", policy_config: dict[str, Any] | None = None,
                 policies: dict[str, Any] | None = None, explore: bool = True, **single_agent_options: Any):
        # single_agent_options: vectorization, restart_failed_sub_environments, env_wrappers, ...: a
        # RolloutWorker's, which the config refuses or a multi-agent worker has no use for.
        from flowrl.multi_agent_env import make_multi_agent_env

        if num_threads:
            torch.set_num_threads(num_threads)
            # numpy's BLAS too (policies act through numpy matmuls): by default its threads, one
            # per core, spin between calls, which on a busy machine slows sampling 2-4x.
            threadpool_limits(num_threads, user_api="blas")
        self.index = actor_index
        self.env_name = env
        self.fragment_length = rollout_fragment_length
        self.count_steps_by = count_steps_by
        self.seed = worker_seed(seed, actor_index)
        self.explore = explore
        self.normalizer = None  # the normalize preset is single-agent
        self.envs = [make_multi_agent_env(env, env_config) for _ in range(num_envs_per_worker if sample else 1)]
        self.agent_names: list[str] = list(self.envs[0].possible_agents)
        self._agent_index = {a: i for i, a in enumerate(self.agent_names)}
        self.setup: MultiAgentSetup = parse_multiagent(multiagent).resolve(self.agent_names)
        # A policy's spaces are those of the first agent mapped to it; every agent it gets must match.
        self.policies = dict(policies or {})
        first_agent = first_agents(self.agent_names, self.setup)
        for k, pid in enumerate(self.setup.policy_ids):
            if pid in self.policies:
                continue
            agent = first_agent[pid]
            settings = self.setup.settings[pid]
            policy_class, options = policy_class_of(settings, policy, policy_config)  # a policy's own `plan`
            self.policies[pid] = make_policy(
                policy_class, self.envs[0].observation_space(agent), self.envs[0].action_space(agent),
                model=settings.get("model", model), lr=settings.get("lr", lr),
                seed=None if seed is None else seed + 7919 * k,
                sample_seed=None if self.seed is None else self.seed + 7919 * k, **options)
        for agent in self.agent_names:
            pid = self.setup.mapping(agent, 0)
            p = self.policies[pid]
            if (self.envs[0].observation_space(agent), self.envs[0].action_space(agent)) != \
                    (p.observation_space, p.action_space):
                raise ConfigError("config.multiagent.policy_mapping",
                                  f"agent {agent!r} has other spaces than policy {pid!r} (of agent "
                                  f"{first_agent.get(pid)!r}); map it to a policy of its own")
        self.policies_to_train = list(self.setup.policies_to_train)
        self.spaces = {pid: {"obs": p.observation_space, "new_obs": p.observation_space, "actions": p.action_space}
                       for pid, p in self.policies.items()}
        self._stacks: dict[tuple[str, ...], list[tuple[list[str], PolicyStack]]] = {}  # see _stacks_of
        if not sample:
            for e in self.envs:
                e.close()
            self.envs = []
            return
        # Unique episode ids across workers and runs, as RolloutWorker's.
        self._eps_id_base = int(np.random.default_rng().integers(2 ** 62))
        self._num_episodes = 0
        self._episodes: list[_Episode] = []
        self._obs: list[dict[str, Any]] = []
        for i, e in enumerate(self.envs):
            self._obs.append(self._reset(i, e, None if self.seed is None else self.seed + i))

    @property
    def policy(self):
        raise AttributeError("a multi-agent worker has one policy per policy id: use .policies[name]")

    def _reset(self, i: int, env: Any, seed: int | None) -> dict[str, Any]:
        try:
            obs, _ = env.reset(seed=seed)
        except Exception as e:
            raise EnvFaultError(f"worker {self.index}: env {self.env_name!r} raised {describe_error(e)} "
                                "while resetting") from e
        episode = _Episode(self._eps_id_base + self._num_episodes)
        self._num_episodes += 1
        if i < len(self._episodes):
            self._episodes[i] = episode
        else:
            self._episodes.append(episode)
        return obs

    def _policy_of(self, episode: _Episode, agent: str) -> str:
        pid = episode.policy.get(agent)
        if pid is None:
            pid = episode.policy[agent] = self.setup.mapping(agent, episode.eps_id)
            if pid is None:
                raise ConfigError("config.multiagent.policy_mapping", f"agent {agent!r} maps to no policy")
            if agent not in self._agent_index:  # an agent the env did not list in possible_agents
                self._agent_index[agent] = len(self.agent_names)
                self.agent_names.append(agent)
        return pid

    # ---- sampling ---------------------------------------------------------------------------------
    def sample(self) -> MultiAgentBatch:
        rows: dict[str, list[tuple]] = {pid: [] for pid in self.policies}
        team_episodes: list[tuple[float, int]] = []
        agent_episodes: dict[str, list[tuple[float, int]]] = {pid: [] for pid in self.policies}
        for _ in range(self.fragment_length):
            actions = self._act()
            for i, env in enumerate(self.envs):
                self._step(i, env, actions[i], rows, team_episodes, agent_episodes)
        # A policy none of whose agents finished a transition in this call has no batch in it.
        batches = {pid: self._policy_batch(pid, rows[pid]) for pid in self.policies if rows[pid]}
        return MultiAgentBatch(batches, len(self.envs) * self.fragment_length, team_episodes, self.count_steps_by,
                               policy_episodes={pid: e for pid, e in agent_episodes.items() if e})

    def _act(self) -> list[dict[str, Any]]:
        """Actions for every agent that must act, in every copy: one call per PolicyStack (a
        policy, or policies that act as one). Opens each acting agent's transition."""
        groups: dict[str, list[tuple[int, str]]] = {}
        episodes = self._episodes
        for i, obs in enumerate(self._obs):
            episode = episodes[i]
            mapped = episode.policy
            for agent in obs:
                pid = mapped.get(agent)
                if pid is None:
                    pid = self._policy_of(episode, agent)
                members = groups.get(pid)
                if members is None:
                    members = groups[pid] = []
                members.append((i, agent))
        actions: list[dict[str, Any]] = [{} for _ in self.envs]
        index = self._agent_index
        for pids, stack in self._stacks_of(groups):
            raw = [[self._obs[i][agent] for i, agent in groups[pid]] for pid in pids]
            out = stack.compute_actions([_batch_obs(p.observation_space, r) for p, r in zip(stack.policies, raw)],
                                        self.explore)
            members = [member for pid in pids for member in groups[pid]]
            versions = [p.weights_version for p, r in zip(stack.policies, raw) for _ in r]
            # Python numbers (one tolist per call) are cheaper to gather into columns than numpy scalars.
            for (i, agent), obs, version, env_action, action, logp, value in zip(
                    members, itertools.chain(*raw), versions, _rows(out.env_actions), _rows(out.actions),
                    out.logp.tolist(), out.values.tolist()):
                actions[i][agent] = env_action
                episode = episodes[i]
                # The first nine of _ROW_FIELDS; the reward adds up until the transition closes.
                episode.open[agent] = [obs, action, 0.0, logp, value, episode.t.get(agent, 0), version,
                                       episode.eps_id, index[agent]]
        return actions

    def _stacks_of(self, pids: Iterable[str]) -> list[tuple[list[str], PolicyStack]]:
        """The acting policies `pids` as the PolicyStacks they act in (flowrl.policy_stack), made
        once per set of acting policies: a stack keeps copies of its policies' weights."""
        key = tuple(sorted(pids))
        found = self._stacks.get(key)
        if found is None:
            found = self._stacks[key] = [([key[j] for j in group], PolicyStack([self.policies[key[j]] for j in group]))
                                         for group in stacks([self.policies[pid] for pid in key])]
        return found

    def _step(self, i: int, env: Any, actions: dict[str, Any], rows: dict[str, list], team_episodes: list,
              agent_episodes: dict[str, list]) -> None:
        episode = self._episodes[i]
        try:
            next_obs, rewards, terminations, truncations, _ = env.step(actions)
        except Exception as e:
            raise EnvFaultError(f"worker {self.index}: env {self.env_name!r} raised {describe_error(e)} at step "
                                f"{episode.length + 1} of an episode") from e
        episode.length += 1
        open_, returns, team_return = episode.open, episode.returns, episode.team_return
        for agent, reward in rewards.items():
            reward = float(reward)
            team_return += reward
            returns[agent] = returns.get(agent, 0.0) + reward
            transition = open_.get(agent)
            if transition is not None:
                transition[2] += reward
        episode.team_return = team_return
        acting = {a: o for a, o in next_obs.items() if not (terminations.get(a) or truncations.get(a))}
        for agent in list(open_):
            terminated, truncated = terminations.get(agent, False), truncations.get(agent, False)
            if not (agent in next_obs or terminated or truncated or not acting):
                continue  # a turn-based agent waiting for its turn
            # Closes: the agent acts again, leaves, or the episode ended with it still waiting
            # (then it is truncated, bootstrapping from the observation it had).
            transition = open_.pop(agent)
            terminated = bool(terminated)
            truncated = not terminated and (bool(truncated) or agent not in acting)
            # Observations as the env gave them: made arrays, all at once, in _policy_batch.
            transition += (next_obs[agent] if agent in next_obs else transition[0], terminated, truncated)
            rows[episode.policy[agent]].append(transition)
            episode.t[agent] = transition[5] + 1
        if acting:
            self._obs[i] = acting
            return
        team_episodes.append((episode.team_return, episode.length))
        for agent, pid in episode.policy.items():
            agent_episodes[pid].append((episode.returns.get(agent, 0.0), episode.t.get(agent, 0)))
        self._obs[i] = self._reset(i, env, None)

    def _policy_batch(self, pid: str, rows: list[tuple]) -> SampleBatch:
        """One policy's rows as a SampleBatch, trajectory by trajectory, with next_vf_preds."""
        policy = self.policies[pid]
        space = policy.observation_space
        fields = dict(zip(_ROW_FIELDS, zip(*rows)))
        columns = {name: _batch_obs(space, list(fields[name])) if name in ("obs", "new_obs") else np.array(fields[name])
                   for name in _COLUMN_ORDER}
        order = np.lexsort((columns["t"], columns["agent_id"], columns["eps_id"]))
        columns = {k: v[order] for k, v in columns.items()}
        columns["actions"] = columns["actions"].astype(_action_dtype(policy.action_space), copy=False)
        columns["rewards"] = columns["rewards"].astype(np.float32)
        columns["action_logp"] = columns["action_logp"].astype(np.float32)
        columns["vf_preds"] = columns["vf_preds"].astype(np.float32)
        next_vf = policy.value(columns["new_obs"]).astype(np.float32)
        columns["next_vf_preds"] = np.where(columns["terminateds"], np.float32(0.0), next_vf)
        return SampleBatch(columns, self.spaces[pid])

    def use_learner_device(self, device: torch.device) -> None:
        """Multi-agent policies learn on the CPU (the config refuses a GPU learner with multiagent)."""
        if device.type != "cpu":
            raise ValueError(f"a multi-agent learner on {device} is not supported yet")

    # ---- changing the policies while a plan runs (self-play) ----------------------------------
    def add_policy(self, policy_id: str, like: str, weights: dict[str, torch.Tensor] | None = None) -> None:
        """A new policy that acts but does not learn: a copy of policy `like` (its class, spaces
        and weights, or `weights`), such as a frozen snapshot of a learning policy as an opponent.
        Adding it again replaces it (a worker made anew is given every change made so far)."""
        if policy_id in self.setup.policies_to_train:
            raise ValueError(f"policy {policy_id!r} is a policy to train; a copy needs a name of its own")
        policy = copy.deepcopy(self.policies[like])
        if weights is not None:
            policy.set_weights(weights)
        self.policies[policy_id] = policy
        self.spaces[policy_id] = dict(self.spaces[like])
        self._stacks.clear()

    def set_policy_mapping(self, mapping: Callable[[str, int], str]) -> None:
        """Agents of the episodes that start from now on go to `mapping(agent_id, episode_id)`."""
        self.setup.mapping = checked_mapping(mapping, self.policies, "set_policy_mapping")

    # ---- weights ----------------------------------------------------------------------------------
    def get_weights(self, policy_ids: list[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """{policy id: weights} of `policy_ids` (default: all)."""
        return {pid: self.policies[pid].get_weights() for pid in (policy_ids or self.policies)}

    def set_weights(self, weights: dict[str, dict[str, torch.Tensor]], versions: dict[str, int] | None = None) -> None:
        for pid, w in weights.items():
            self.policies[pid].set_weights(w, None if versions is None else versions[pid])

    def weights_version(self) -> dict[str, int]:
        return {pid: p.weights_version for pid, p in self.policies.items()}

    def node_id(self) -> str | None:
        from flowrl.cluster import node_id

        return node_id()

    def close(self) -> None:
        for e in self.envs:
            e.close()


def evaluate_multi_agent(policies: dict[str, Any], env: str, env_config: dict[str, Any] | None, multiagent: dict,
                         episodes: int = 10, seed: int = 0, explore: bool = False
                         ) -> tuple[list[float], dict[str, list[float]]]:
    """Team returns of `episodes` whole episodes in one env (reset first with `seed`) where
    `policies` act (greedily unless `explore`), and the returns of each policy's agents in them."""
    worker = MultiAgentRolloutWorker(env, multiagent, env_config=env_config, seed=seed, rollout_fragment_length=1,
                                     policies=policies, explore=explore, num_threads=None)
    team: list[float] = []
    per_policy: dict[str, list[float]] = {pid: [] for pid in worker.policies}
    try:
        while len(team) < episodes:
            batch = worker.sample()
            team.extend(r for r, _ in batch.episodes)
            for pid, agent_episodes in batch.policy_episodes.items():
                per_policy[pid].extend(r for r, _ in agent_episodes)
    finally:
        worker.close()
    return team, per_policy
