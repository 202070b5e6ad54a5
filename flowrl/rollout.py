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

import copy
import threading
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from flowrl.device import default_learner_threads
from flowrl.env_pipeline import EnvPipeline, TrainingTransform, frozen_observations
from flowrl.envs import FAULT_INFO_KEY, EnvFaultError, describe_error, make_vector_env
from flowrl.normalize import Normalizer
from flowrl.executors import ActorSet
from flowrl.policy import TorchPolicy, make_policy, obs_to_array
from flowrl.sample_batch import SampleBatch

_COLUMNS = ("obs", "new_obs", "actions", "rewards", "terminateds", "truncateds", "eps_id", "t",
            "action_logp", "vf_preds", "weights_version")
_STEP_COLUMNS = ("obs", "new_obs", "actions", "rewards", "terminateds", "truncateds", "action_logp", "vf_preds")


# Keys of the normalize preset's statistics among the weights sent to rollout workers.
NORMALIZE_PREFIX = "normalize:"


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
                 observation_space: gym.Space | None = None, action_space: gym.Space | None = None,
                 policy: str = "TorchPolicy", policy_config: dict[str, Any] | None = None,
                 restart_failed_sub_environments: bool = False, env_wrappers: list | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)  # one thread per worker; the learner takes more (learner_threads)
        self.index = actor_index
        self.env_name = env
        self.fragment_length = rollout_fragment_length
        self.seed = worker_seed(seed, actor_index)
        if env is None:
            if sample or observation_space is None or action_space is None:
                raise ValueError("a RolloutWorker without an env samples nothing and needs observation_space "
                                 "and action_space")
            self.env = None
            self.observation_space, self.action_space = observation_space, action_space
        else:
            self.env = make_vector_env(env, num_envs_per_worker if sample else 1, env_config, vectorization,
                                       restart_failed_sub_environments, EnvPipeline.parse(env_wrappers))
            self.observation_space = self.env.single_observation_space
            self.action_space = self.env.single_action_space
        # Clipped or normalized training rewards (env_wrappers presets): episode returns are the raw ones.
        self._transformed = isinstance(self.env, TrainingTransform)
        # The normalize preset's statistics; the local worker's are the master copy.
        self.normalizer: Normalizer | None = self.env.normalizer if self._transformed else None
        # Every copy of the policy starts from the same weights (the base seed); each worker
        # samples actions from its own seed.
        # `policy` names the class (flowrl.policy.POLICY_CLASSES), `policy_config` its own options.
        self.policy = make_policy(policy, self.observation_space, self.action_space, model=model, seed=seed, lr=lr,
                                  sample_seed=self.seed, **(policy_config or {}))
        self.spaces = {"obs": self.observation_space, "new_obs": self.observation_space,
                       "actions": self.action_space}
        self._acting: Any = None  # a CPU copy of the policy that samples, when the learner's is on a GPU
        if not sample:
            if self.env is not None:
                self.env.close()
            self.env = None
            return
        n = self.env.num_envs
        try:
            obs, infos = self.env.reset(seed=self.seed)
        except Exception as e:
            raise self._env_fault(e, "while resetting") from e
        self._obs = obs_to_array(self.observation_space, obs)
        if self._obs.dtype.kind == "f" and not np.isfinite(self._obs).all():
            raise EnvFaultError(f"worker {self.index}: env {env!r} gave NaN or inf in its first observation")
        # Sub-envs made anew (restart_failed_sub_environments) and not yet reported in a batch.
        self._env_faults = int(np.sum(infos.get("_" + FAULT_INFO_KEY, 0)))
        self._num_steps = 0  # of the vector env, for error messages
        box = isinstance(self.observation_space, gym.spaces.Box)
        self._obs_shape = self.observation_space.shape if box else None
        # Per sub-env state of the episode in progress.
        self._episode_number = np.zeros(n, dtype=np.int64)  # eps_id = base + number * n + env
        # A random base per worker instance, from the OS's entropy (not the seed): ids stay unique
        # across runs, resumes and replaced workers, so recordings can be merged (int64 with room
        # for 2^62 episodes; two instances overlap with odds ~ episodes / 2^61).
        self._eps_id_base = int(np.random.default_rng().integers(2 ** 62))
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
        raw_l = [] if self._transformed else None  # rewards before clipping or normalizing
        obs_space, policy, env = self.observation_space, self._acting_policy(), self.env
        obs = self._obs
        resetting = self._needs_reset
        faults: list[tuple[int, np.ndarray]] = []  # (step, sub-envs made anew there): rows to drop
        while (short := T - int(counts.min())) > 0:
            # No sub-env can be done before `short` more steps: take them without counting.
            start = len(obs_l)
            for _ in range(short):
                out = policy.compute_actions(obs)
                try:
                    next_obs, rewards, terminateds, truncateds, infos = env.step(out.env_actions)
                except Exception as e:
                    raise self._env_fault(e, f"at step {self._num_steps + len(obs_l) + 1} of its vector env") from e
                if infos and FAULT_INFO_KEY in infos:
                    faults.append((len(obs_l), infos["_" + FAULT_INFO_KEY].copy()))
                next_obs = obs_to_array(obs_space, next_obs)
                obs_l.append(obs)
                new_obs_l.append(next_obs)
                actions_l.append(out.actions)
                rewards_l.append(rewards)
                if raw_l is not None:
                    raw_l.append(env.raw_rewards)
                term_l.append(terminateds)
                trunc_l.append(truncateds)
                logp_l.append(out.logp)
                vf_l.append(out.values)
                obs = next_obs
            # A step right after a sub-env was done is its reset, not a transition.
            done = np.logical_or(term_l[start:], trunc_l[start:])
            counts += short - resetting - done[:-1].sum(axis=0)
            for step, remade in faults:  # nor is the step of a sub-env made anew (unless it was a reset)
                if step >= start:
                    counts -= remade & ~(resetting if step == start else done[step - start - 1])
            resetting = done[-1]
        self._obs = obs
        self._num_steps += len(obs_l)
        # (num_envs, num_steps, ...); np.array of a list is a few times cheaper than np.stack.
        steps = {k: np.ascontiguousarray(np.array(v).swapaxes(0, 1)) for k, v in fresh.items()}
        if raw_l is not None:
            steps["raw_rewards"] = np.array(raw_l).swapaxes(0, 1)
        remade = np.zeros(steps["terminateds"].shape, dtype=bool)
        for step, envs in faults:
            remade[:, step] = envs
        self._check_steps(steps, remade)
        episodes = self._label_steps(steps, remade)
        env_faults, self._env_faults = self._env_faults + int(remade.sum()), 0
        if self._leftover is not None:
            steps = {k: np.concatenate([self._leftover[k], steps[k]], axis=1) for k in self._leftover}
        return self._assemble(steps, episodes, env_faults)

    def _env_fault(self, error: Exception, when: str) -> EnvFaultError:
        """EnvFaultError naming this worker, the env, the exception and when it was raised."""
        if isinstance(error, EnvFaultError):  # from a SubEnv, which names the sub-env and the step
            return EnvFaultError(f"worker {self.index}: {error}")
        return EnvFaultError(f"worker {self.index}: env {self.env_name!r} raised {describe_error(error)} {when}")

    def _check_steps(self, steps: dict[str, np.ndarray], remade: np.ndarray) -> None:
        """Observations of the observation_space's shape, and no NaN or inf in observations or
        rewards: found here, one line naming the column, rather than as a NaN loss later. One
        pass over arrays of a few thousand numbers per call. (Each row's obs is the previous
        row's new_obs or a reset's, which is the new_obs of the autoreset row.)"""
        shape = steps["new_obs"].shape[2:]
        if self._obs_shape is not None and shape != self._obs_shape:
            raise EnvFaultError(f"worker {self.index}: env {self.env_name!r} gave observations of shape {shape}; "
                                f"its observation_space has shape {self._obs_shape}")
        for column in ("new_obs", "rewards"):
            values = steps[column]
            if values.dtype.kind != "f":
                continue
            finite = np.isfinite(values)
            if finite.all():
                continue
            env, step = np.argwhere(~finite.reshape(finite.shape[0], finite.shape[1], -1).all(axis=2))[0]
            kind = "NaN" if np.isnan(values[env, step]).any() else "inf"
            with np.errstate(invalid="ignore"):  # only to tell the step of the episode
                self._label_steps(steps, remade)
            when = f"at step {steps['t'][env, step] + 1} of an episode" if steps["valid"][env, step] else "when reset"
            raise EnvFaultError(f"worker {self.index}: env {self.env_name!r} gave {kind} in column {column!r} "
                                f"(sub-env {env}, {when})")

    def _label_steps(self, steps: dict[str, np.ndarray], remade: np.ndarray) -> list[tuple[float, int]]:
        """Adds valid, eps_id, t and weights_version to freshly sampled steps, carrying episode
        state over from the previous call; returns (return, length) of finished episodes.

        `remade` marks the steps where a sub-env raised and was made anew: like an autoreset
        that step is no transition, and the next one starts a new episode. The episode it cut
        never finishes: it is not reported, and its last row bootstraps from V(new_obs) (the
        next row's vf_preds, which is V of the same observation)."""
        n, S = steps["terminateds"].shape
        done = steps["terminateds"] | steps["truncateds"]
        invalid = np.empty((n, S), dtype=bool)  # the step after a done is the autoreset
        invalid[:, 0] = self._needs_reset
        invalid[:, 1:] = done[:, :-1]
        invalid |= remade
        valid = ~invalid
        rewards = steps.get("raw_rewards", steps["rewards"]).astype(np.float64) * valid  # returns of the raw ones
        # Counts and sums restart at each reset step: subtract their value at the last reset.
        last_reset = np.maximum.accumulate(np.where(invalid, np.arange(S), -1), axis=1)
        seen_reset = last_reset >= 0
        at_reset = (np.arange(n)[:, None], np.maximum(last_reset, 0))
        count = np.cumsum(valid, axis=1)
        ret = np.cumsum(rewards, axis=1)
        t = np.where(seen_reset, count - count[at_reset] - 1, count - 1 + self._t[:, None])
        ret = np.where(seen_reset, ret - ret[at_reset], ret + self._ep_return[:, None])
        episode_number = self._episode_number[:, None] + np.cumsum(invalid, axis=1)
        steps["eps_id"] = self._eps_id_base + episode_number * n + np.arange(n)[:, None]
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

    def _assemble(self, steps: dict[str, np.ndarray], episodes, env_faults: int = 0) -> SampleBatch:
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
            next_vf[need] = (self._acting or self.policy).value(steps["new_obs"][need])
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
        delta = self.normalizer.pop_delta() if self.normalizer is not None else None
        return SampleBatch(columns, self.spaces, episodes, env_faults=env_faults, normalize_delta=delta)

    # ---- the learner's device ----------------------------------------------------------------------
    def use_learner_device(self, device: torch.device) -> None:
        """Puts this worker's policy (the driver's: the learner's) on `device`. Sampling then acts
        with a CPU copy of it, brought up to date before each sample() (one device-to-host copy of
        the acting weights, under 1 ms for the Nature CNN): rollouts stay on the CPU."""
        if device.type == "cpu":
            return
        if self.env is not None:
            self._acting = copy.deepcopy(self.policy)
        self.policy.to_device(device)

    def _acting_policy(self) -> Any:
        if self._acting is None:
            return self.policy
        self._acting.set_weights(self.policy.get_weights(), self.policy.weights_version)
        return self._acting

    # ---- weights ----------------------------------------------------------------------------------
    def get_weights(self) -> dict[str, torch.Tensor]:
        """The policy's weights and, with the normalize preset, the merged statistics (under
        NORMALIZE_PREFIX): what the driver sends to the rollout workers."""
        weights = self.policy.get_weights()
        if self.normalizer is not None:
            weights.update({NORMALIZE_PREFIX + k: v for k, v in self.normalizer.state_dict().items()})
        return weights

    def set_weights(self, weights: dict[str, torch.Tensor], version: int | None = None) -> None:
        stats = {k[len(NORMALIZE_PREFIX):]: v for k, v in weights.items() if k.startswith(NORMALIZE_PREFIX)}
        if stats:
            weights = {k: v for k, v in weights.items() if not k.startswith(NORMALIZE_PREFIX)}
            if self.normalizer is not None:
                self.normalizer.load_state_dict(stats)
        self.policy.set_weights(weights, version)

    def weights_version(self) -> int:
        return self.policy.weights_version

    def node_id(self) -> str | None:
        """The Ray node this worker runs on (None outside Ray)."""
        from flowrl.cluster import node_id

        return node_id()

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


def evaluate_policy(policy: TorchPolicy, env: str, env_config: dict[str, Any] | None = None, episodes: int = 10,
                    seed: int = 0, explore: bool = False, with_lengths: bool = False, parallel: int = 10,
                    pipeline: EnvPipeline | None = None, normalizer: Normalizer | None = None):
    """Returns of `episodes` whole episodes in fresh envs (seeds seed, seed + 1, ...), acting
    greedily unless `explore`; with `with_lengths`, (returns, lengths). The envs have the
    wrappers of `pipeline` (the run's env_wrappers) and observations are normalized with
    `normalizer`'s statistics, frozen; returns are of the raw rewards. Up to `parallel`
    episodes run side by side, one env each, with one policy call per step for all that are
    still running: each episode has its own env and seed, so a greedy policy scores what it
    would playing them one after another."""
    returns, lengths = [0.0] * episodes, [0] * episodes
    # Policy calls on a few rows are slower with intra-op threads (they wait on each other on a
    # busy machine): one thread, as rollout workers and a run's driver have.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for first in range(0, episodes, parallel):
            _play_side_by_side(policy, env, env_config, range(first, min(first + parallel, episodes)), seed, explore,
                               returns, lengths, pipeline, normalizer)
    finally:
        torch.set_num_threads(threads)
    return (returns, lengths) if with_lengths else returns


def _play_side_by_side(policy: TorchPolicy, env: str, env_config: dict[str, Any] | None, indexes: range, seed: int,
                       explore: bool, returns: list[float], lengths: list[int], pipeline: EnvPipeline | None = None,
                       normalizer: Normalizer | None = None) -> None:
    """Episodes `indexes` (episode i in an env reset with seed + i) to their ends, adding up
    their returns and lengths."""
    from flowrl.envs import make_env

    space = policy.observation_space
    envs: dict[int, gym.Env] = {}
    try:
        obs = {}
        for i in indexes:
            envs[i] = make_env(env, env_config, pipeline)
            obs[i], _ = envs[i].reset(seed=seed + i)
        while obs:
            running = list(obs)
            batch = frozen_observations(normalizer, _stack_obs(space, [obs[i] for i in running]))
            actions = policy.compute_actions(obs_to_array(space, batch), explore).env_actions
            for i, action in zip(running, actions):
                obs[i], reward, terminated, truncated, _ = envs[i].step(int(action) if np.ndim(action) == 0 else action)
                returns[i] += float(reward)
                lengths[i] += 1
                if terminated or truncated:
                    del obs[i]
    finally:
        for e in envs.values():
            e.close()


def _stack_obs(space: gym.Space, items: list) -> Any:
    """Observations of single envs as one batch (dicts and tuples part by part)."""
    if isinstance(space, gym.spaces.Dict):
        return {k: _stack_obs(s, [o[k] for o in items]) for k, s in space.spaces.items()}
    if isinstance(space, gym.spaces.Tuple):
        return tuple(_stack_obs(s, [o[j] for o in items]) for j, s in enumerate(space.spaces))
    return np.stack([np.asarray(o) for o in items])


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
    every batch that ParallelRollouts samples (`write(batch)`, `close()`). Remote workers have
    `actor_start_timeout_s` to be placed and built (see ActorSet). `input_source`, when given,
    is where ParallelRollouts takes its batches from instead (`stream(workers)`: a policy server
    for external applications, flowrl.connectors.external). On a Ray cluster of several nodes
    `placement_strategy` lays the remote workers out (flowrl.cluster; SPREAD: over every node).
    `learner_device` (flowrl.device.resolve_device) is where the local worker's policy learns, with
    `learner_num_threads` torch threads (default: flowrl.device.default_learner_threads)."""

    def __init__(self, num_workers: int = 0, num_cpus_per_worker: float = 1.0, max_restarts: int = 3,
                 output: Any = None, actor_start_timeout_s: float = 60.0, input_source: Any = None,
                 placement_strategy: str = "SPREAD", learner_device: torch.device | None = None,
                 learner_num_threads: int | None = None, **worker_kwargs: Any):
        self.output = output
        self.input_source = input_source
        if worker_kwargs.get("seed") is None:
            # One seed for all, so that every policy copy starts from the same weights.
            worker_kwargs["seed"] = int(np.random.SeedSequence().entropy % (2**31))
        self.worker_kwargs = worker_kwargs
        worker_cls = RolloutWorker
        if worker_kwargs.get("multiagent") is not None:  # config.multiagent: one policy per policy id
            from flowrl.multi_agent_rollout import MultiAgentRolloutWorker as worker_cls
        self.local_worker = worker_cls(**worker_kwargs, actor_index=0,
                                       sample=num_workers == 0 and worker_kwargs.get("env") is not None)
        if learner_device is not None:  # remote workers stay on the CPU
            self.local_worker.use_learner_device(learner_device)
        self.learner_num_threads = learner_num_threads or default_learner_threads(
            num_workers, num_cpus_per_worker, acting_in_turn=num_workers == 0 and input_source is None)
        self.remote_workers = ActorSet(worker_cls, num_workers, kwargs=worker_kwargs, name=worker_cls.__name__,
                                       max_restarts=max_restarts, num_cpus_per_actor=num_cpus_per_worker,
                                       index_offset=1,  # index 0 is the local worker
                                       start_timeout_s=actor_start_timeout_s, placement_strategy=placement_strategy)
        self.remote_workers.on_replace.append(self._sync_replacement)
        self.remote_workers.on_start.append(self.sync_weights)
        # Multi-agent: the policies trained, and those whose epsilon alone changed, since
        # UpdateWeights last sent them. The train and store streams mark them from their own
        # threads under the Ray executor, so marking and taking hold one lock.
        self._trained_policies: set[str] = set()
        self._explored_policies: set[str] = set()
        self._marks_lock = threading.Lock()
        self._policy_changes: list[tuple[str, tuple]] = []  # multi-agent: add_policy / set_policy_mapping calls

    def mark_trained(self, policy_id: str) -> None:
        """Multi-agent: `policy_id` trained; UpdateWeights sends its weights under a new version."""
        with self._marks_lock:
            self._trained_policies.add(policy_id)

    def mark_explored(self, policy_id: str) -> None:
        """Multi-agent: `policy_id`'s epsilon changed; UpdateWeights sends it (alone, if it did not train)."""
        with self._marks_lock:
            self._explored_policies.add(policy_id)

    def take_marked(self) -> tuple[list[str], list[str]]:
        """The policies trained and those explored but not trained since the last call, each
        sorted, and forget them: one step, so that a mark made meanwhile waits for the next call."""
        with self._marks_lock:
            trained, explored = sorted(self._trained_policies), sorted(self._explored_policies - self._trained_policies)
            self._trained_policies.clear()
            self._explored_policies.clear()
        return trained, explored

    def sync_weights(self) -> None:
        """Give every remote worker the learner's weights and version (at start, after a resume)."""
        if self.remote_workers.started and self.num_remote_workers:
            for method, args in self._policy_changes:  # workers made from worker_kwargs lack them
                self.remote_workers.foreach(method, *args)
            weights = self.remote_workers.executor.put(self.local_worker.get_weights())
            self.remote_workers.foreach("set_weights", weights, self.local_worker.weights_version())

    def _sync_replacement(self, index: int) -> None:
        for method, args in self._policy_changes:
            self.remote_workers.get(index, self.remote_workers.submit(index, method, *args), method)
        ref = self.remote_workers.submit(index, "set_weights", self.local_worker.get_weights(),
                                         self.local_worker.weights_version())
        self.remote_workers.get(index, ref, "set_weights")

    @property
    def policy(self) -> TorchPolicy:
        return self.local_worker.policy

    @property
    def is_multi_agent(self) -> bool:
        return hasattr(self.local_worker, "policies")

    @property
    def policies(self) -> dict[str, TorchPolicy]:
        """The learner's policies by id: multi-agent ones, or the one policy as "default_policy"."""
        return self.local_worker.policies if self.is_multi_agent else {"default_policy": self.local_worker.policy}

    def add_policy(self, policy_id: str, like: str) -> None:
        """Multi-agent: a new policy on every worker, a frozen copy of policy `like` as it is now
        (self-play: a snapshot of a learning policy as an opponent). It acts once a mapping
        (`set_policy_mapping`) names it; it never learns."""
        weights = self.local_worker.policies[like].get_weights()
        self.local_worker.add_policy(policy_id, like, weights)
        self._change_policies("add_policy", (policy_id, like, weights))

    def added_policies(self) -> dict[str, str]:
        """{policy id: the policy it was copied from} of the policies add_policy made (saved in
        checkpoints, which make them again on restore)."""
        return {args[0]: args[1] for method, args in self._policy_changes if method == "add_policy"}

    def set_policy_mapping(self, mapping: Callable[[str, int], str]) -> None:
        """Multi-agent: `mapping(agent_id, episode_id)` on every worker, for episodes that start
        from now on (a module-level function, or one Ray can pickle)."""
        self.local_worker.set_policy_mapping(mapping)
        self._change_policies("set_policy_mapping", (mapping,))

    def _change_policies(self, method: str, args: tuple) -> None:
        self._policy_changes.append((method, args))  # replayed on workers made later
        if self.remote_workers.started and self.num_remote_workers:
            self.remote_workers.foreach(method, *args)

    @property
    def steps_counter(self) -> str:
        """The counter that schedules follow: num_agent_steps_sampled with count_steps_by:
        agent_steps (multi-agent), else num_env_steps_sampled."""
        by_agent = self.is_multi_agent and self.worker_kwargs.get("count_steps_by") == "agent_steps"
        return "num_agent_steps_sampled" if by_agent else "num_env_steps_sampled"

    @property
    def policies_to_train(self) -> list[str]:
        return self.local_worker.policies_to_train if self.is_multi_agent else ["default_policy"]

    def evaluation_env(self) -> dict[str, Any]:
        """evaluate_policy's pipeline and normalizer: the workers' env_wrappers, and the
        normalize statistics (applied frozen)."""
        return {"pipeline": EnvPipeline.parse(self.worker_kwargs.get("env_wrappers")),
                "normalizer": self.local_worker.normalizer}

    @property
    def num_remote_workers(self) -> int:
        return self.remote_workers.num_actors

    @property
    def spaces(self) -> dict[str, gym.Space]:
        return self.local_worker.spaces
