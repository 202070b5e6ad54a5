"""Operators that produce and shape experience: ParallelRollouts, ConcatBatches,
SelectExperiences, SelectPolicies, StandardizeFields, ComputeAdvantages.

With a multi-agent env the stream carries MultiAgentBatches (flowrl.multi_agent_batch): the
shaping operators apply to each policy's batch, and ConcatBatches counts env steps or agent
steps as `count_steps_by` says."""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np

from flowrl.executors import from_actors, gather_sync
from flowrl.multi_agent_batch import MultiAgentBatch, concat_batches, per_policy
from flowrl.plan import PlanContext
from flowrl.returns import gae, n_step_returns
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.stream import FlatMap, Map, Stream


class Gather(enum.Enum):
    """How ParallelRollouts collects from the workers; either way it yields SampleBatches."""

    SYNC = "sync"    # all workers sample with the same weights; one concatenated batch per round
    ASYNC = "async"  # each worker's batch as soon as it is ready (bounded in-flight calls)


class RecordSampled(Map):
    """Counts sampled env steps, finished episodes and sub-envs made anew after raising
    (`num_env_faults`, which also counts remote workers replaced for their env's fault) into the
    plan's state, and hands each batch to `output` (a dataset writer: `write(batch)`, `close()`)
    when there is one; passes batches on. With the normalize preset, each batch's statistics
    delta is merged into `normalizer`, the driver's master copy (flowrl.normalize)."""

    def __init__(self, output=None, normalizer=None):
        self.output = output
        self.normalizer = normalizer

    def setup(self, ctx: PlanContext) -> None:
        self.ctx = ctx
        ctx.counters.setdefault("num_env_faults", 0)

    def __call__(self, batch: SampleBatch) -> SampleBatch:
        if isinstance(batch, MultiAgentBatch):
            self.ctx.counters["num_env_steps_sampled"] += batch.env_steps
            self.ctx.counters["num_agent_steps_sampled"] += batch.agent_steps
            for pid, episodes in batch.policy_episodes.items():
                self.ctx.policy_episodes[pid].extend(episodes)
        else:
            self.ctx.counters["num_env_steps_sampled"] += len(batch)
        self.ctx.counters["num_env_faults"] += batch.env_faults
        episodes = batch.episodes
        self.ctx.counters["num_episodes"] += len(episodes)
        self.ctx.episodes.extend(episodes)
        if self.normalizer is not None and (delta := batch.normalize_delta):
            self.normalizer.merge_delta(delta)
        if self.output is not None:
            self.output.write(batch)
        return batch

    def teardown(self) -> None:
        if self.output is not None:
            self.output.close()  # the rows still buffered become a file


def ParallelRollouts(workers: WorkerSet, gather: Gather = Gather.SYNC, max_in_flight: int = 2) -> Stream[SampleBatch]:
    """A stream of SampleBatches sampled by the workers (the local worker when there are no
    remote ones; the WorkerSet's `input_source` when it has one: experience from external
    applications, `config: {input: external}`), recorded in the plan's counters, and written to `workers.output` when the
    WorkerSet has one (a `flowrl.connectors.DatasetWriter`, set by `config: {output: DIR}`).

    >>> from flowrl.plan import Plan
    >>> workers = WorkerSet(env="CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=8, seed=0)
    >>> with Plan(ParallelRollouts(workers)) as plan:
    ...     result = plan.step()
    >>> len(result["output"]), result["num_env_steps_sampled"]
    (16, 16)
    """
    if getattr(workers, "input_source", None) is not None:  # external applications (input: external)
        source = workers.input_source.stream(workers)
    elif workers.num_remote_workers == 0:
        source = Stream.source(lambda: iter(workers.local_worker.sample, None), name="LocalRollouts")
    elif gather is Gather.SYNC:
        source = gather_sync(workers.remote_workers, "sample", name="ParallelRollouts").map(
            concat_batches, name="ParallelRollouts.concat")
    else:
        source = from_actors(workers.remote_workers, "sample", max_in_flight=max_in_flight,
                             name="ParallelRollouts")
    return source.then(RecordSampled(workers.output, workers.local_worker.normalizer))


class ConcatBatches(FlatMap):
    """Concatenates incoming batches until they hold at least `min_batch_size` rows (for
MultiAgentBatches: env steps or agent steps, as their `count_steps_by` says).

    >>> from flowrl.plan import Plan
    >>> batches = Stream.from_iterable([SampleBatch({"x": np.arange(3)})] * 4)
    >>> with Plan(batches.then(ConcatBatches(min_batch_size=5))) as plan:
    ...     len(plan.step()["output"])
    6
    """

    def __init__(self, min_batch_size: int):
        if min_batch_size < 1:
            raise ValueError("min_batch_size must be >= 1")
        self.min_batch_size = min_batch_size
        self.buffer: list[SampleBatch] = []
        self.rows = 0

    def __call__(self, batch: SampleBatch):
        self.buffer.append(batch)
        self.rows += len(batch)
        if self.rows < self.min_batch_size:
            return []
        out = concat_batches(self.buffer)
        self.buffer, self.rows = [], 0
        return [out]


class SelectExperiences(Map):
    """Keeps the named columns, and drops rows sampled with weights more than `max_weights_lag`
    versions behind the learner's (for asynchronous plans).

    >>> b = SampleBatch({"obs": np.zeros((3, 2)), "weights_version": np.array([1, 4, 5])})
    >>> SelectExperiences(columns=["weights_version"], max_weights_lag=1, current_version=lambda: 5)(b).columns
    ['weights_version']
    >>> len(SelectExperiences(max_weights_lag=1, current_version=lambda: 5)(b))
    2
    """

    def __init__(self, columns: Sequence[str] | None = None, max_weights_lag: int | None = None,
                 current_version=None):
        self.columns = list(columns) if columns is not None else None
        self.max_weights_lag = max_weights_lag
        self.current_version = current_version

    @per_policy
    def __call__(self, batch: SampleBatch) -> SampleBatch:
        if self.max_weights_lag is not None:
            lag = self.current_version() - batch["weights_version"]
            keep = np.flatnonzero(lag <= self.max_weights_lag)
            if len(keep) < len(batch):
                batch = batch.take(keep)
        return batch.select(self.columns) if self.columns is not None else batch


class SelectPolicies(Map):
    """Keeps the batches of the named policies in each MultiAgentBatch (the env steps and team
    episodes stay as they were): a branch of a plan that trains some of the policies.

    >>> b = MultiAgentBatch({"a": SampleBatch({"x": np.arange(2)}), "b": SampleBatch({"x": np.arange(3)})}, 2)
    >>> list(SelectPolicies(["b"])(b).policy_batches)
    ['b']
    """

    def __init__(self, policy_ids: Sequence[str]):
        self.policy_ids = list(policy_ids)

    def __call__(self, batch: MultiAgentBatch) -> MultiAgentBatch:
        return batch.select_policies(self.policy_ids)


class StandardizeFields(Map):
    """Rescales each named column to mean 0 and standard deviation 1.

    >>> b = StandardizeFields(["advantages"])(SampleBatch({"advantages": np.array([1.0, 2.0, 3.0])}))
    >>> np.round(b["advantages"], 4).tolist()
    [-1.2247, 0.0, 1.2247]
    """

    def __init__(self, fields: Sequence[str]):
        self.fields = list(fields)

    @per_policy
    def __call__(self, batch: SampleBatch) -> SampleBatch:
        updates = {}
        for name in self.fields:
            x = batch[name].astype(np.float64)
            updates[name] = ((x - x.mean()) / (x.std() + 1e-8)).astype(batch[name].dtype)
        return batch.with_columns(**updates)


def trajectory_ends(batch: SampleBatch) -> np.ndarray:
    """True where the row's trajectory does not go on in the next row: the episode ended, or
    the next row is another episode, another agent (multi-agent batches) or not the next time
    step (a fragment boundary)."""
    eps, t = batch["eps_id"], batch["t"]
    ends = batch["terminateds"] | batch["truncateds"]
    cut = np.ones(len(batch), dtype=bool)
    cut[:-1] = (eps[1:] != eps[:-1]) | (t[1:] != t[:-1] + 1)
    if "agent_id" in batch:
        agent = batch["agent_id"]
        cut[:-1] |= agent[1:] != agent[:-1]
    return ends | cut


class ComputeAdvantages(Map):
    """Adds `advantages` and `value_targets`: GAE(lambda), or n-step returns when `n_step` is
    given (advantages = returns - values). Uses `vf_preds` and `next_vf_preds` from the workers.

    >>> b = SampleBatch({"rewards": np.ones(2, np.float32), "vf_preds": np.zeros(2, np.float32),
    ...                  "next_vf_preds": np.zeros(2, np.float32), "terminateds": np.array([False, True]),
    ...                  "truncateds": np.zeros(2, bool), "eps_id": np.array([1, 1]), "t": np.array([0, 1])})
    >>> ComputeAdvantages(gamma=0.5, lam=1.0)(b)["value_targets"].tolist()
    [1.5, 1.0]
    """

    def __init__(self, gamma: float = 0.99, lam: float = 0.95, n_step: int | None = None):
        self.gamma, self.lam, self.n_step = gamma, lam, n_step

    @per_policy
    def __call__(self, batch: SampleBatch) -> SampleBatch:
        dones = trajectory_ends(batch)
        args = (batch["rewards"], batch["vf_preds"], batch["next_vf_preds"], batch["terminateds"], dones)
        if self.n_step is None:
            advantages, targets = gae(*args, gamma=self.gamma, lam=self.lam)
        else:
            targets = n_step_returns(*args, gamma=self.gamma, n=self.n_step)
            advantages = targets - batch["vf_preds"]
        return batch.with_columns(advantages=advantages, value_targets=targets)
