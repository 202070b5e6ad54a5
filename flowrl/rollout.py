"""Rollout workers: a gymnasium vector env plus a copy of the policy, sampling SampleBatches.

Gymnasium 1.x vector envs reset a finished sub-env on the NEXT step: the step after a done
returns the reset observation and ignores its action. That row is not a transition, so it
never reaches a batch. Each `sample()` returns exactly `rollout_fragment_length` rows per
sub-env, laid out sub-env by sub-env (env 0's rows, then env 1's, ...); rows sampled beyond
that (a sub-env that had fewer resets) are kept for the next call.

Columns: obs, new_obs, actions, rewards, terminateds, truncateds, eps_id, t, action_logp,
vf_preds, next_vf_preds (V(new_obs) where the trajectory stops in this batch without
terminating, else the next row's vf_preds), weights_version. `batch.episodes` holds
(return, length) of the episodes that finished.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs import make_vector_env
from flowrl.executors import ActorSet
from flowrl.policy import TorchPolicy, obs_to_array
from flowrl.sample_batch import SampleBatch

_COLUMNS = ("obs", "new_obs", "actions", "rewards", "terminateds", "truncateds", "eps_id", "t",
            "action_logp", "vf_preds", "weights_version")
_STEP_COLUMNS = ("obs", "new_obs", "actions", "rewards", "terminateds", "truncateds", "action_logp", "vf_preds")


def worker_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else seed + 10_007 * index


class RolloutWorker:
    """Owns a vector env of `num_envs_per_worker` sub-envs and a policy copy.

    `actor_index` 0 is the local worker (in the driver, also the learner's policy); remote
    workers are 1..N. With `sample=False` no env is kept (a learner that never samples); such a
    worker may be given `observation_space` and `action_space` instead of an env (offline
    training from a dataset that names no env).
    """

    def __init__(self, env: str | None, num_envs_per_worker: int = 1, rollout_fragment_length: int = 200,
                 env_config: dict[str, Any] | None = None, vectorization: str = "auto",
                 model: dict[str, Any] | None = None, seed: int | None = None, lr: float = 3e-4,
                 actor_index: int = 0, sample: bool = True, num_threads: int | None = 1,
                 observation_space: gym.Space | None = None, action_space: gym.Space | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)  # one thread per worker: workers share the cores
        self.index = actor_index
        self.fragment_length = rollout_fragment_length
        self.seed = worker_seed(seed, actor_index)
        if env is None:
            if sample or observation_space is None or action_space is None:
                raise ValueError("a RolloutWorker without an env samples nothing and needs observation_space "
                                 "and action_space")
            self.env = None
            self.observation_space, self.action_space = observation_space, action_space
        else:
            self.env = make_vector_env(env, num_envs_per_worker if sample else 1, env_config, vectorization)
            self.observation_space = self.env.single_observation_space
            self.action_space = self.env.single_action_space
        # Every copy of the policy starts from the same weights (the base seed); each worker
        # samples actions from its own seed.
        self.policy = TorchPolicy(self.observation_space, self.action_space, model, seed=seed, lr=lr,
                                  sample_seed=self.seed)
        self.spaces = {"obs": self.observation_space, "new_obs": self.observation_space,
                       "actions": self.action_space}
        if not sample:
            if self.env is not None:
                self.env.close()
            self.env = None
            return
        n = self.env.num_envs
        obs, _ = self.env.reset(seed=self.seed)
        self._obs = obs_to_array(self.observation_space, obs)
        # Per sub-env state of the episode in progress.
        self._episode_number = np.zeros(n, dtype=np.int64)  # eps_id = (index << 40) + number * n + env
        self._t = np.zeros(n, dtype=np.int64)
        self._ep_return = np.zeros(n, dtype=np.float64)
        self._needs_reset = np.zeros(n, dtype=bool)
        self._leftover: dict[str, np.ndarray] | None = None

    # ---- sampling ---------------------------------------------------------------------------------
    def sample(self) -> SampleBatch:
        n, T = self.env.num_envs, self.fragment_length
        counts = np.zeros(n, dtype=np.int64) if self._leftover is None else self._leftover["valid"].sum(axis=1)
        # Per step only what the policy and the env give; episode ids, time steps and returns
        # are worked out for all steps at once afterwards (numpy calls per step are the overhead).
        fresh: dict[str, list[np.ndarray]] = {k: [] for k in _STEP_COLUMNS}
        obs_l, new_obs_l, actions_l, rewards_l, term_l, trunc_l, logp_l, vf_l = fresh.values()
        obs_space, policy, env = self.observation_space, self.policy, self.env
        obs = self._obs
        resetting = self._needs_reset
        while (short := T - int(counts.min())) > 0:
            # No sub-env can be done before `short` more steps: take them without counting.
            start = len(obs_l)
            for _ in range(short):
                out = policy.compute_actions(obs)
                next_obs, rewards, terminateds, truncateds, _ = env.step(out.env_actions)
                next_obs = obs_to_array(obs_space, next_obs)
                obs_l.append(obs)
                new_obs_l.append(next_obs)
                actions_l.append(out.actions)
                rewards_l.append(rewards)
                term_l.append(terminateds)
                trunc_l.append(truncateds)
                logp_l.append(out.logp)
                vf_l.append(out.values)
                obs = next_obs
            # A step right after a sub-env was done is its reset, not a transition.
            done = np.logical_or(term_l[start:], trunc_l[start:])
            counts += short - resetting - done[:-1].sum(axis=0)
            resetting = done[-1]
        self._obs = obs
        # (num_envs, num_steps, ...); np.array of a list is a few times cheaper than np.stack.
        steps = {k: np.ascontiguousarray(np.array(v).swapaxes(0, 1)) for k, v in fresh.items()}
        episodes = self._label_steps(steps)
        if self._leftover is not None:
            steps = {k: np.concatenate([self._leftover[k], steps[k]], axis=1) for k in self._leftover}
        return self._assemble(steps, episodes)

    def _label_steps(self, steps: dict[str, np.ndarray]) -> list[tuple[float, int]]:
        """Adds valid, eps_id, t and weights_version to freshly sampled steps, carrying episode
        state over from the previous call; returns (return, length) of finished episodes."""
        n, S = steps["terminateds"].shape
        done = steps["terminateds"] | steps["truncateds"]
        invalid = np.empty((n, S), dtype=bool)  # the step after a done is the autoreset
        invalid[:, 0] = self._needs_reset
        invalid[:, 1:] = done[:, :-1]
        valid = ~invalid
        rewards = steps["rewards"].astype(np.float64) * valid
        # Counts and sums restart at each reset step: subtract their value at the last reset.
        last_reset = np.maximum.accumulate(np.where(invalid, np.arange(S), -1), axis=1)
        seen_reset = last_reset >= 0
        at_reset = (np.arange(n)[:, None], np.maximum(last_reset, 0))
        count = np.cumsum(valid, axis=1)
        ret = np.cumsum(rewards, axis=1)
        t = np.where(seen_reset, count - count[at_reset] - 1, count - 1 + self._t[:, None])
        ret = np.where(seen_reset, ret - ret[at_reset], ret + self._ep_return[:, None])
        episode_number = self._episode_number[:, None] + np.cumsum(invalid, axis=1)
        steps["eps_id"] = (self.index << 40) + episode_number * n + np.arange(n)[:, None]
        steps["t"] = t
        steps["valid"] = valid
        steps["rewards"] = steps["rewards"].astype(np.float32)
        steps["weights_version"] = np.full((n, S), self.policy.weights_version, dtype=np.int64)
        finished = valid & done
        episodes = [(float(r), int(k) + 1) for r, k in zip(ret[finished], t[finished])]
        # Carry the state of each sub-env's current episode into the next call.
        self._needs_reset = done[:, -1].copy()
        self._episode_number = episode_number[:, -1].copy()
        self._t = np.where(valid[:, -1], t[:, -1] + 1, 0)
        self._ep_return = np.where(valid[:, -1], ret[:, -1], 0.0)
        return episodes

    def _assemble(self, steps: dict[str, np.ndarray], episodes) -> SampleBatch:
        """`steps` holds arrays of shape (num_envs, num_steps, ...). Take the first T valid rows
        of each sub-env, env by env; keep the valid rows after them for the next call."""
        T = self.fragment_length
        valid = steps["valid"]
        rank = np.cumsum(valid, axis=1) - 1          # index of each valid row within its sub-env
        keep = valid & (rank < T)
        # V(s_{t+1}): inside an episode the next step's vf_preds (the step after a row that did not
        # end is always a valid row of the same episode); where the episode stops here without
        # terminating (truncation, or the last row we hold), a fresh estimate from new_obs.
        terminateds, truncateds = steps["terminateds"], steps["truncateds"]
        ends = terminateds | truncateds
        following = np.zeros_like(steps["vf_preds"])
        following[:, :-1] = steps["vf_preds"][:, 1:]
        next_vf = np.where(ends, 0.0, following).astype(np.float32)
        held_last = rank == valid.sum(axis=1, keepdims=True) - 1
        need = keep & ((truncateds & ~terminateds) | (~ends & held_last))
        if need.any():
            next_vf[need] = self.policy.value(steps["new_obs"][need])
        rows = np.flatnonzero(keep)  # one index for every column: cheaper than a mask per column
        columns = {k: np.take(steps[k].reshape(-1, *steps[k].shape[2:]), rows, axis=0) for k in _COLUMNS}
        columns["next_vf_preds"] = np.take(next_vf.reshape(-1), rows)
        carry = valid & (rank >= T)
        if carry.any():
            first = int(np.flatnonzero(carry.any(axis=0))[0])
            self._leftover = {k: steps[k][:, first:] for k in _COLUMNS}
            self._leftover["valid"] = carry[:, first:]
        else:
            self._leftover = None
        return SampleBatch(columns, self.spaces, episodes)

    # ---- weights ----------------------------------------------------------------------------------
    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.policy.get_weights()

    def set_weights(self, weights: dict[str, torch.Tensor], version: int | None = None) -> None:
        self.policy.set_weights(weights, version)

    def weights_version(self) -> int:
        return self.policy.weights_version

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


def evaluate_policy(policy: TorchPolicy, env: str, env_config: dict[str, Any] | None = None, episodes: int = 10,
                    seed: int = 0, explore: bool = False, with_lengths: bool = False):
    """Returns of `episodes` whole episodes in a fresh env (seeds seed, seed + 1, ...), acting
    greedily unless `explore`; with `with_lengths`, (returns, lengths)."""
    from flowrl.envs import make_env

    e = make_env(env, env_config)
    space = policy.observation_space
    returns, lengths = [], []
    try:
        for i in range(episodes):
            obs, _ = e.reset(seed=seed + i)
            total, done, steps = 0.0, False, 0
            while not done:
                steps += 1
                action = policy.compute_actions(obs_to_array(space, add_batch_dim(space, obs)), explore).env_actions[0]
                obs, reward, terminated, truncated, _ = e.step(int(action) if np.ndim(action) == 0 else action)
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
            lengths.append(steps)
    finally:
        e.close()
    return (returns, lengths) if with_lengths else returns


def add_batch_dim(space: gym.Space, obs: Any) -> Any:
    if isinstance(space, gym.spaces.Dict):
        return {k: add_batch_dim(s, obs[k]) for k, s in space.spaces.items()}
    if isinstance(space, gym.spaces.Tuple):
        return tuple(add_batch_dim(s, o) for s, o in zip(space.spaces, obs))
    return np.asarray(obs)[None]


class WorkerSet:
    """The local worker (in the driver; its policy is the one trained) and `num_workers`
    remote rollout workers (an ActorSet, started with the plan). A replaced remote worker gets
    the local worker's current weights before it samples again. `output`, when given, records
    every batch that ParallelRollouts samples (`write(batch)`, `close()`)."""

    def __init__(self, num_workers: int = 0, num_cpus_per_worker: float = 1.0, max_restarts: int = 3,
                 output: Any = None, **worker_kwargs: Any):
        self.output = output
        if worker_kwargs.get("seed") is None:
            # One seed for all, so that every policy copy starts from the same weights.
            worker_kwargs["seed"] = int(np.random.SeedSequence().entropy % (2**31))
        self.worker_kwargs = worker_kwargs
        self.local_worker = RolloutWorker(**worker_kwargs, actor_index=0,
                                          sample=num_workers == 0 and worker_kwargs.get("env") is not None)
        self.remote_workers = ActorSet(RolloutWorker, num_workers, kwargs=worker_kwargs, name="RolloutWorker",
                                       max_restarts=max_restarts, num_cpus_per_actor=num_cpus_per_worker,
                                       index_offset=1)  # index 0 is the local worker
        self.remote_workers.on_replace.append(self._sync_replacement)
        self.remote_workers.on_start.append(self.sync_weights)

    def sync_weights(self) -> None:
        """Give every remote worker the learner's weights and version (at start, after a resume)."""
        if self.remote_workers.started and self.num_remote_workers:
            policy = self.local_worker.policy
            weights = self.remote_workers.executor.put(policy.get_weights())
            self.remote_workers.foreach("set_weights", weights, policy.weights_version)

    def _sync_replacement(self, index: int) -> None:
        policy = self.local_worker.policy
        ref = self.remote_workers.submit(index, "set_weights", policy.get_weights(), policy.weights_version)
        self.remote_workers.get(index, ref, "set_weights")

    @property
    def policy(self) -> TorchPolicy:
        return self.local_worker.policy

    @property
    def num_remote_workers(self) -> int:
        return self.remote_workers.num_actors

    @property
    def spaces(self) -> dict[str, gym.Space]:
        return self.local_worker.spaces
