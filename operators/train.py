"""Operators that learn and share what was learned: LearningRateSchedule, TrainOneStep,
ComputeGradients, AverageGradients, ApplyGradients, UpdateWeights, UpdateTargetNetwork.

A loss function has the signature `loss_fn(policy, batch: dict[str, Tensor]) -> (loss, stats)`
where `stats` maps names to floats or 0-d tensors (reported as the learner's statistics), or to
numpy arrays with a value per row (a TD error for prioritized replay), which pass through
TrainOneStep as arrays, joined over its minibatches in the order they were trained.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowrl.config import schedule_value
from flowrl.device import batch_to_device, learner_threads
from flowrl.multi_agent_batch import MultiAgentBatch
from flowrl.plan import PlanContext
from flowrl.policy import TorchPolicy
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.stream import FlatMap, Map

LossFn = Callable[[TorchPolicy, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]


def _floats(stats: dict[str, Any]) -> dict[str, float | np.ndarray]:
    return {k: v if isinstance(v, np.ndarray) else float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            for k, v in stats.items()}


def _mean_stats(all_stats: list[dict[str, float | np.ndarray]]) -> dict[str, float | np.ndarray]:
    """The mean of each statistic over minibatches; per-row arrays are joined instead."""
    out: dict[str, float | np.ndarray] = {}
    for k in all_stats[0] if all_stats else ():
        values = [s[k] for s in all_stats]
        out[k] = np.concatenate(values) if isinstance(values[0], np.ndarray) else float(np.mean(values))
    return out


def trained_rows(workers: WorkerSet, batch: SampleBatch | MultiAgentBatch) -> dict[str, SampleBatch]:
    """The rows a batch trains, by policy id (as in workers.policies): a SampleBatch's under
    default_policy, a MultiAgentBatch's of each policy to train that has rows in it (in
    policies_to_train's order)."""
    if not isinstance(batch, MultiAgentBatch):
        return {"default_policy": batch}
    return {pid: batch[pid] for pid in workers.policies_to_train if len(batch.policy_batches.get(pid, ()))}


def clip_and_step(policy: TorchPolicy, grad_clip: float | None) -> float | None:
    norm = None
    if grad_clip is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip))
    policy.optimizer.step()
    return norm


class LearningRateSchedule(Map):
    """Sets the learner's learning rate from `schedule` ([[timestep, lr], ...], piecewise
    linear in the env steps sampled so far, agent steps with count_steps_by: agent_steps; None:
    `lr` throughout; multi-agent: each policy's own lr) before each training
    step. Passes its input on unchanged and reports `lr`. Every built-in plan with an
    optimizer puts one before its training step, so `lr_schedule` means the same in all.

    >>> from flowrl.plan import Plan
    >>> from flowrl.stream import Stream
    >>> workers = WorkerSet(env="CartPole-v1", rollout_fragment_length=4, seed=0)
    >>> op = LearningRateSchedule(workers, lr=0.1, schedule=[[0, 0.01], [1000, 0.0]])
    >>> with Plan(Stream.from_iterable(range(3)).then(op)) as plan:
    ...     plan.ctx.counters["num_env_steps_sampled"] = 250
    ...     result = plan.step()
    >>> result["lr"], workers.policy.optimizer.param_groups[0]["lr"]
    (0.0075, 0.0075)
    """

    def __init__(self, workers: WorkerSet, lr: float, schedule: list | None):
        self.workers, self.lr, self.schedule = workers, lr, schedule

    def setup(self, ctx: PlanContext) -> None:
        self.ctx = ctx

    def __call__(self, item: Any) -> Any:
        steps = self.ctx.counters[self.workers.steps_counter]
        if not self.workers.is_multi_agent:
            lr = schedule_value(self.schedule, steps, self.lr)
            self.workers.policy.set_lr(lr)
            self.ctx.info["lr"] = lr
            return item
        for pid, policy in self.workers.policies.items():  # without a schedule each keeps its own lr
            policy.set_lr(schedule_value(self.schedule, steps, policy.lr))
            self.ctx.info[f"policy/{pid}/lr"] = policy.lr
        return item


class TrainOneStep(Map):
    """Runs `num_sgd_iter` passes of minibatch SGD on the learner policy (the local worker's)
    over each batch and yields the learner's statistics, averaged over the minibatches. A
    MultiAgentBatch trains each of the workers' policies_to_train on its own rows, with its own
    optimizer; statistics are then under policy/<name>/, and the rows each policy trained are
    counted in `policy/<name>/num_agent_steps_trained` (UpdateTargetNetwork's schedule).

    >>> from flowrl.plan import Plan
    >>> from flowrl.stream import Stream
    >>> workers = WorkerSet(env="CartPole-v1", rollout_fragment_length=16, seed=0)
    >>> def value_loss(policy, b):
    ...     loss = ((policy.model(b["obs"])[1] - b["rewards"]) ** 2).mean()
    ...     return loss, {"vf_loss": loss}
    >>> batches = Stream.source(lambda: iter(workers.local_worker.sample, None))
    >>> with Plan(batches.then(TrainOneStep(workers, value_loss, num_sgd_iter=2, sgd_minibatch_size=8))) as plan:
    ...     result = plan.step()
    >>> result["num_env_steps_trained"], "vf_loss" in result
    (16, True)
    """

    def __init__(self, workers: WorkerSet, loss_fn: LossFn, num_sgd_iter: int = 1,
                 sgd_minibatch_size: int | None = None, grad_clip: float | None = None, seed: int | None = 0,
                 before_update: Callable[[], None] | None = None):
        self.workers = workers
        self.loss_fn = loss_fn
        self.num_sgd_iter = num_sgd_iter
        self.sgd_minibatch_size = sgd_minibatch_size
        self.grad_clip = grad_clip
        self.rng = np.random.default_rng(seed)
        self.before_update = before_update

    def setup(self, ctx: PlanContext) -> None:
        self.counters = ctx.counters

    def __call__(self, batch: SampleBatch | MultiAgentBatch) -> dict[str, float]:
        if self.before_update is not None:
            self.before_update()
        if isinstance(batch, MultiAgentBatch):
            return self._train_policies(batch)
        t0 = time.perf_counter()
        out = self._train(self.workers.policy, batch)
        self.counters["num_env_steps_trained"] += len(batch)
        out["learn_time_s"] = time.perf_counter() - t0
        return out

    def _train_policies(self, batch: MultiAgentBatch) -> dict[str, float]:
        """Each policy to train that has rows in `batch`, with its own optimizer; statistics
        under policy/<name>/. The policies trained are marked for UpdateWeights to send."""
        t0 = time.perf_counter()
        out: dict[str, Any] = {}
        for pid, policy_batch in trained_rows(self.workers, batch).items():
            stats = self._train(self.workers.policies[pid], policy_batch)
            out.update({f"policy/{pid}/{k}": v for k, v in stats.items()})
            self.counters["num_agent_steps_trained"] += len(policy_batch)
            self.counters[f"policy/{pid}/num_agent_steps_trained"] += len(policy_batch)
            self.workers.mark_trained(pid)
        self.counters["num_env_steps_trained"] += batch.env_steps
        out["learn_time_s"] = time.perf_counter() - t0
        return out

    def _train(self, policy: TorchPolicy, batch: SampleBatch) -> dict[str, float | np.ndarray]:
        all_stats = []
        # On the learner's device once per batch; minibatches are indexed from these, there.
        tensors = batch_to_device(batch.to_torch(), policy.device)
        n = len(batch)
        size = min(self.sgd_minibatch_size or n, n)
        with learner_threads(self.workers.learner_num_threads):
            for _ in range(self.num_sgd_iter):
                for minibatch in _minibatches(tensors, n, size, self.rng, policy.device):
                    loss, stats = self.loss_fn(policy, minibatch)
                    policy.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    norm = clip_and_step(policy, self.grad_clip)
                    stats = _floats(stats)
                    if norm is not None:
                        stats["grad_norm"] = norm
                    all_stats.append(stats)
        return _mean_stats(all_stats)


def _minibatches(tensors: dict[str, torch.Tensor], n: int, size: int, rng: np.random.Generator,
                 device: torch.device):
    """One pass in random order; a minibatch that is the whole batch needs no shuffling."""
    if size >= n:
        yield tensors
        return
    order = torch.from_numpy(rng.permutation(n)).to(device)
    for start in range(0, n, size):
        index = order[start:start + size]
        yield {k: v[index] for k, v in tensors.items()}


@dataclass
class Gradients:
    """Gradients of the learner policy's parameters for one batch."""

    grads: list[torch.Tensor | None]
    stats: dict[str, float]
    num_rows: int


@dataclass
class MultiAgentGradients:
    """Gradients of each policy to train for one MultiAgentBatch, and the env steps it covers."""

    policy_gradients: dict[str, Gradients]
    env_steps: int


class ComputeGradients(Map):
    """Computes the loss's gradients on a batch without applying them. With `microbatch_size`,
    the loss runs on microbatches of that many rows, one graph at a time, and the gradients are
    their row-weighted mean (the full batch's for a mean loss; statistics: the microbatches'
    mean). A MultiAgentBatch gives MultiAgentGradients: each policy to train with rows in it,
    on its own rows.

    >>> import gymnasium as gym
    >>> workers = WorkerSet(env="CartPole-v1", rollout_fragment_length=4, seed=0)
    >>> def loss(policy, b):
    ...     return policy.model(b["obs"])[1].mean(), {}
    >>> g = ComputeGradients(workers, loss)(workers.local_worker.sample())
    >>> g.num_rows, len(g.grads) == len(list(workers.policy.model.parameters()))
    (4, True)
    """

    def __init__(self, workers: WorkerSet, loss_fn: LossFn, microbatch_size: int | None = None):
        self.workers = workers
        self.loss_fn = loss_fn
        self.microbatch_size = microbatch_size

    def __call__(self, batch: SampleBatch | MultiAgentBatch) -> Gradients | MultiAgentGradients:
        if isinstance(batch, MultiAgentBatch):
            return MultiAgentGradients({pid: self._gradients(self.workers.policies[pid], b)
                                        for pid, b in trained_rows(self.workers, batch).items()}, batch.env_steps)
        return self._gradients(self.workers.policy, batch)

    def _gradients(self, policy: TorchPolicy, batch: SampleBatch) -> Gradients:
        n = len(batch)
        size = self.microbatch_size or max(n, 1)
        tensors = batch_to_device(batch.to_torch(), policy.device)
        all_stats = []
        policy.optimizer.zero_grad(set_to_none=True)
        with learner_threads(self.workers.learner_num_threads):
            for start in range(0, n, size):
                part = {k: v[start:start + size] for k, v in tensors.items()}
                loss, stats = self.loss_fn(policy, part)
                (loss * (min(size, n - start) / n)).backward()   # accumulates the row-weighted mean
                all_stats.append(_floats(stats))
        grads = [None if p.grad is None else p.grad.detach().clone() for p in policy.model.parameters()]
        return Gradients(grads, _mean_stats(all_stats), n)


class AverageGradients(FlatMap):
    """Collects `num_batches` Gradients and yields their mean, weighted by rows (a true mean:
    the learning rate means the same whatever the number of microbatches).

    >>> a = Gradients([torch.tensor([1.0])], {"loss": 1.0}, 1)
    >>> b = Gradients([torch.tensor([4.0])], {"loss": 3.0}, 3)
    >>> avg = AverageGradients(2); _ = avg(a); (g,) = avg(b)
    >>> g.grads[0].item(), g.stats["loss"], g.num_rows
    (3.25, 2.0, 4)
    """

    def __init__(self, num_batches: int):
        self.num_batches = num_batches
        self.pending: list[Gradients] = []

    def __call__(self, grads: Gradients):
        self.pending.append(grads)
        if len(self.pending) < self.num_batches:
            return []
        pending, self.pending = self.pending, []
        total = sum(g.num_rows for g in pending)
        mean = []
        for parts in zip(*(g.grads for g in pending)):
            present = [(g, p) for g, p in zip(pending, parts) if p is not None]
            mean.append(sum(p * (g.num_rows / total) for g, p in present) if present else None)
        stats = _mean_stats([g.stats for g in pending]) if all(g.stats for g in pending) else {}
        return [Gradients(mean, stats, total)]


class ApplyGradients(Map):
    """Applies Gradients with the learner's optimizer; yields the learner's statistics.
    MultiAgentGradients: each policy's with its own optimizer, statistics under policy/<name>/;
    the policies stepped are marked for UpdateWeights to send.

    >>> from flowrl.plan import Plan
    >>> from flowrl.stream import Stream
    >>> workers = WorkerSet(env="CartPole-v1", rollout_fragment_length=4, seed=0)
    >>> def loss(policy, b):
    ...     return policy.model(b["obs"])[1].mean(), {"v": policy.model(b["obs"])[1].mean()}
    >>> grads = Stream.source(lambda: iter(workers.local_worker.sample, None)).then(ComputeGradients(workers, loss))
    >>> with Plan(grads.then(ApplyGradients(workers, grad_clip=1.0))) as plan:
    ...     result = plan.step()
    >>> result["num_env_steps_trained"], sorted(k for k in result if k in ("v", "grad_norm"))
    (4, ['grad_norm', 'v'])
    """

    def __init__(self, workers: WorkerSet, grad_clip: float | None = None):
        self.workers = workers
        self.grad_clip = grad_clip

    def setup(self, ctx: PlanContext) -> None:
        self.counters = ctx.counters

    def __call__(self, grads: Gradients | MultiAgentGradients) -> dict[str, float]:
        if isinstance(grads, MultiAgentGradients):
            out = {}
            for pid, policy_grads in grads.policy_gradients.items():
                stats = self._apply(self.workers.policies[pid], policy_grads)
                out.update({f"policy/{pid}/{k}": v for k, v in stats.items()})
                self.counters["num_agent_steps_trained"] += policy_grads.num_rows
                self.counters[f"policy/{pid}/num_agent_steps_trained"] += policy_grads.num_rows  # as TrainOneStep
                self.workers.mark_trained(pid)
            self.counters["num_env_steps_trained"] += grads.env_steps
            return out
        self.counters["num_env_steps_trained"] += grads.num_rows
        return self._apply(self.workers.policy, grads)

    def _apply(self, policy: TorchPolicy, grads: Gradients) -> dict[str, float]:
        for param, grad in zip(policy.model.parameters(), grads.grads):
            param.grad = grad
        norm = clip_and_step(policy, self.grad_clip)
        stats = dict(grads.stats)
        if norm is not None:
            stats["grad_norm"] = norm
        return stats


class UpdateWeights(Map):
    """After a training step, gives the remote workers the learner's weights under a new
    version number. `wait=False` sends them without waiting (sampling is not blocked), and not
    to a worker that has yet to take the last ones it was sent (it is busy sampling): it gets a
    later version instead of a queue of versions each replacing the last. Passes
    its input on unchanged and reports `weights_version`. Multi-agent: only the policies trained
    since the last update are sent, each with a version of its own (policy/<name>/weights_version),
    to every worker (a push of some policies cannot be skipped for a later one).

    >>> from flowrl.plan import Plan
    >>> from flowrl.stream import Stream
    >>> workers = WorkerSet(num_workers=1, env="CartPole-v1", rollout_fragment_length=4, seed=0)
    >>> with Plan(Stream.from_iterable([{"loss": 1.0}] * 3).then(UpdateWeights(workers))) as plan:
    ...     versions = [plan.step()["weights_version"] for _ in range(3)]
    ...     remote = workers.remote_workers.foreach("weights_version")
    >>> versions, remote
    ([1, 2, 3], [3])
    """

    def __init__(self, workers: WorkerSet, wait: bool = True):
        self.workers = workers
        self.wait = wait

    def setup(self, ctx: PlanContext) -> None:
        self.ctx = ctx
        ctx.start_actors(self.workers.remote_workers)  # they may have no source in this plan

    def __call__(self, item: Any) -> Any:
        if self.workers.is_multi_agent:
            self._update_policies()
            return item
        policy = self.workers.policy
        policy.weights_version += 1
        remote = self.workers.remote_workers
        if remote.num_actors:
            # One copy in the object store for all workers, not one per call.
            weights = remote.executor.put(self.workers.local_worker.get_weights())  # with normalize statistics
            if self.wait:
                remote.foreach("set_weights", weights, policy.weights_version)
            else:
                remote.foreach_latest("set_weights", weights, policy.weights_version)
        self.ctx.info["weights_version"] = policy.weights_version
        return item

    def _update_policies(self) -> None:
        """Multi-agent: only the policies trained since the last update, each under a new
        version of its own, reported as policy/<name>/weights_version; and the epsilon alone
        of those whose exploration rate alone changed (ExplorationSchedule), version kept."""
        changed, explored = self.workers.take_marked()
        policies = self.workers.policies
        for pid in changed:
            policies[pid].weights_version += 1
        remote = self.workers.remote_workers
        if (changed or explored) and remote.num_actors:
            weights = self.workers.local_worker.get_weights(changed) if changed else {}
            weights.update({pid: policies[pid].get_exploration() for pid in explored})
            versions = {pid: policies[pid].weights_version for pid in weights}
            weights = remote.executor.put(weights)
            if self.wait:
                remote.foreach("set_weights", weights, versions)
            else:
                remote.foreach_async("set_weights", weights, versions)
        for pid, policy in policies.items():
            self.ctx.info[f"policy/{pid}/weights_version"] = policy.weights_version


class UpdateTargetNetwork(Map):
    """Every `every_steps` trained env steps, moves `policy.target_model` towards the learner's
    network: theta_target <- tau * theta + (1 - tau) * theta_target. `tau=1.0` (the default) is
    a copy, as in DQN; a small tau with `every_steps=1` is the Polyak averaging of SAC (Lillicrap
    et al. 2016). The network followed is `policy.target_source` where the policy has one (SAC:
    its critics), else `policy.model`; the target is a copy of it made on first use. Passes its
    input on and reports the number of updates. Multi-agent: the policies `policy_ids` names
    (APPO: every policy to train), by default every policy to train that has a target network
    (a replay policy; not a PPO one beside it), are each updated every `every_steps` rows that
    policy trained (`policy/<name>/num_agent_steps_trained`, TrainOneStep's count), so a PPO
    learner beside a DQN one does not hasten the DQN's copies. Each policy's schedule is in
    `policy/<name>/last_target_update_step` and `policy/<name>/num_target_updates`; the plan's
    `num_target_updates` counts every policy's updates and `last_target_update_step` is the
    plan's trained steps at the latest one.

    >>> from flowrl.plan import Plan
    >>> from flowrl.stream import Stream
    >>> workers = WorkerSet(env="CartPole-v1", rollout_fragment_length=4, seed=0)
    >>> op = UpdateTargetNetwork(workers, every_steps=100)
    >>> with Plan(Stream.from_iterable(range(3)).then(op)) as plan:
    ...     plan.ctx.counters["num_env_steps_trained"] = 250
    ...     result = plan.step()
    >>> result["num_target_updates"], workers.policy.target_model is not None
    (1, True)
    """

    def __init__(self, workers: WorkerSet, every_steps: int, tau: float = 1.0,
                 policy_ids: Sequence[str] | None = None):
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        self.workers = workers
        self.every_steps = every_steps
        self.tau = float(tau)
        self.policy_ids = policy_ids

    def setup(self, ctx: PlanContext) -> None:
        self.ctx = ctx
        for key in ("last_target_update_step", "num_target_updates"):
            ctx.counters.setdefault(key, 0)
        policies = self.workers.policies
        self.trained = self.workers.steps_counter.replace("_sampled", "_trained")
        # (policy, counter prefix of its schedule, counter its schedule follows)
        if self.workers.is_multi_agent:
            ids = self.policy_ids
            if ids is None:
                ids = [p for p in self.workers.policies_to_train if hasattr(policies[p], "target_model")]
            self.schedules = [(policies[p], f"policy/{p}/", f"policy/{p}/num_agent_steps_trained") for p in ids]
            for _, prefix, _ in self.schedules:
                for key in ("last_target_update_step", "num_target_updates"):
                    ctx.counters.setdefault(prefix + key, 0)
        else:
            self.schedules = [(self.workers.policy, "", self.trained)]
        for policy, _, _ in self.schedules:
            if getattr(policy, "target_model", None) is None:
                policy.target_model = copy.deepcopy(_target_source(policy)).requires_grad_(False)

    def __call__(self, item: Any) -> Any:
        # The step of the last update and the update count are plan counters, so that a resumed
        # run keeps the target network's schedule.
        counters = self.ctx.counters
        for policy, prefix, steps_key in self.schedules:
            trained = counters[steps_key]
            if trained - counters[prefix + "last_target_update_step"] < self.every_steps:
                continue
            source, target = _target_source(policy), policy.target_model
            if self.tau == 1.0:
                target.load_state_dict(source.state_dict())
            else:
                with torch.no_grad():   # one kernel call for all the tensors
                    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), self.tau)
            counters[prefix + "last_target_update_step"] = trained
            counters[prefix + "num_target_updates"] += 1
            if prefix:  # multi-agent: the plan's totals as well
                counters["last_target_update_step"] = counters[self.trained]
                counters["num_target_updates"] += 1
        return item


def _target_source(policy: Any) -> torch.nn.Module:
    """The network a policy's target network follows: `target_source` (SAC's critics), else its model."""
    return getattr(policy, "target_source", policy.model)
