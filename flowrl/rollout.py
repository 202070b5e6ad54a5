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

import os
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


def worker_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else seed + 10_007 * index


class RolloutWorker:
    """Owns a vector env of `num_envs_per_worker` sub-envs and a policy copy.

    `actor_index` 0 is the local worker (in the driver, also the learner's policy); remote
    workers are 1..N. With `sample=False` no env is kept (a learner that never samples).
    """

    def __init__(self, env: str, num_envs_per_worker: int = 1, rollout_fragment_length: int = 200,
                 env_config: dict[str, Any] | None = None, vectorization: str = "auto",
                 model: dict[str, Any] | None = None, seed: int | None = None, lr: float = 3e-4,
                 actor_index: int = 0, sample: bool = True, num_threads: int | None = 1):
        if num_threads:
            torch.set_num_threads(num_threads)  # one thread per worker: workers share the cores
        self.index = actor_index
        self.fragment_length = rollout_fragment_length
        self.seed = worker_seed(seed, actor_index)
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
            self.env.close()
            self.env = None
            return
        n = self.env.num_envs
        self._next_eps = 0
        obs, _ = self.env.reset(seed=self.seed)
        self._obs = obs_to_array(self.observation_space, obs)
        self._eps_id = np.array([self._new_eps_id() for _ in range(n)], dtype=np.int64)
        self._t = np.zeros(n, dtype=np.int64)
        self._ep_return = np.zeros(n, dtype=np.float64)
        self._ep_len = np.zeros(n, dtype=np.int64)
        self._needs_reset = np.zeros(n, dtype=bool)
        self._leftover: list[dict[str, np.ndarray] | None] = [None] * n

    def _new_eps_id(self) -> int:
        self._next_eps += 1
        return (self.index << 40) + self._next_eps  # unique across workers

    # ---- sampling ---------------------------------------------------------------------------------
    def sample(self) -> SampleBatch:
        n, T = self.env.num_envs, self.fragment_length
        counts = np.array([0 if lo is None else len(lo["t"]) for lo in self._leftover])
        steps: dict[str, list[np.ndarray]] = {k: [] for k in (*_COLUMNS, "valid")}
        episodes: list[tuple[float, int]] = []
        version = np.full(n, self.policy.weights_version, dtype=np.int64)
        while counts.min() < T:
            out = self.policy.compute_actions(self._obs)
            next_obs, rewards, terminateds, truncateds, _ = self.env.step(out.env_actions)
            next_obs = obs_to_array(self.observation_space, next_obs)
            valid = ~self._needs_reset  # a sub-env that was done just reset: no transition
            for key, value in (("obs", self._obs), ("new_obs", next_obs), ("actions", out.actions),
                               ("rewards", rewards.astype(np.float32)), ("terminateds", terminateds),
                               ("truncateds", truncateds), ("eps_id", self._eps_id.copy()), ("t", self._t.copy()),
                               ("action_logp", out.logp), ("vf_preds", out.values), ("weights_version", version),
                               ("valid", valid)):
                steps[key].append(value)
            self._ep_return += rewards * valid
            self._ep_len += valid
            self._t += valid
            done = valid & (terminateds | truncateds)
            if self._needs_reset.any():  # these sub-envs started a new episode on this step
                for i in np.flatnonzero(self._needs_reset):
                    self._eps_id[i] = self._new_eps_id()
                    self._t[i] = self._ep_return[i] = self._ep_len[i] = 0
            if done.any():
                for i in np.flatnonzero(done):
                    episodes.append((float(self._ep_return[i]), int(self._ep_len[i])))
            self._needs_reset = done
            self._obs = next_obs
            counts += valid
        return self._assemble(steps, episodes)

    def _assemble(self, steps: dict[str, list[np.ndarray]], episodes) -> SampleBatch:
        n, T = self.env.num_envs, self.fragment_length
        stacked = {k: np.stack(v, axis=1) for k, v in steps.items()}  # (n, steps, ...)
        per_env = []
        for i in range(n):
            rows = stacked["valid"][i]
            fresh = {k: stacked[k][i][rows] for k in _COLUMNS}
            if self._leftover[i] is not None:
                fresh = {k: np.concatenate([self._leftover[i][k], fresh[k]]) for k in _COLUMNS}
            per_env.append(fresh)
        columns = {k: np.concatenate([env_rows[k][:T] for env_rows in per_env]) for k in _COLUMNS}
        # V(s_{t+1}): the next row's value estimate while the episode goes on in the rows we hold;
        # a fresh estimate from new_obs where it stops here without terminating (truncation or the
        # fragment's end).
        next_vf = np.zeros(n * T, dtype=np.float32)
        need = np.zeros(n * T, dtype=bool)
        for i, env_rows in enumerate(per_env):
            held = len(env_rows["t"])
            ends = env_rows["terminateds"][:T] | env_rows["truncateds"][:T]
            following = np.append(env_rows["vf_preds"][1:T + 1], np.zeros(max(0, T + 1 - held), np.float32))[:T]
            has_next = np.arange(T) + 1 < held
            next_vf[i * T:(i + 1) * T] = np.where(ends, 0.0, following)
            need[i * T:(i + 1) * T] = (env_rows["truncateds"][:T] & ~env_rows["terminateds"][:T]) | (~has_next & ~ends)
            self._leftover[i] = {k: v[T:] for k, v in env_rows.items()} if held > T else None
        if need.any():
            next_vf[need] = self.policy.value(columns["new_obs"][need])
        columns["next_vf_preds"] = next_vf
        return SampleBatch(columns, self.spaces, episodes)

    # ---- weights ----------------------------------------------------------------------------------
    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.policy.get_weights()

    def set_weights(self, weights: dict[str, torch.Tensor], version: int | None = None) -> None:
        self.policy.set_weights(weights, version)

    def weights_version(self) -> int:
        return self.policy.weights_version

    def ping(self) -> int:
        return os.getpid()

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


class WorkerSet:
    """The local worker (in the driver; its policy is the one trained) and `num_workers`
    remote rollout workers (an ActorSet, started with the plan). A replaced remote worker gets
    the local worker's current weights before it samples again."""

    def __init__(self, num_workers: int = 0, num_cpus_per_worker: float = 1.0, max_restarts: int = 3,
                 **worker_kwargs: Any):
        if worker_kwargs.get("seed") is None:
            # One seed for all, so that every policy copy starts from the same weights.
            worker_kwargs["seed"] = int(np.random.SeedSequence().entropy % (2**31))
        self.worker_kwargs = worker_kwargs
        self.local_worker = RolloutWorker(**worker_kwargs, actor_index=0, sample=num_workers == 0)
        self.remote_workers = ActorSet(RolloutWorker, num_workers, kwargs=worker_kwargs, name="RolloutWorker",
                                       max_restarts=max_restarts, num_cpus_per_actor=num_cpus_per_worker,
                                       index_offset=1)  # index 0 is the local worker
        self.remote_workers.on_replace.append(self._sync_replacement)

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
