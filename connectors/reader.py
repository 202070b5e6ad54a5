"""The input connector as a plan stream, and what offline plans derive from whole episodes.

`DatasetInput` is a stream of shuffled SampleBatches from a dataset. On the local executor it
reads through `Dataset.batches` (pyarrow); on the Ray executor a Parquet dataset is read
through Ray Data, whose read tasks run in parallel across the cluster's nodes, with Ray Data's
local shuffle buffer. Rows read count as `num_env_steps_sampled` (as RLlib counts offline
input) and as `num_rows_read`.

>>> import tempfile, numpy as np
>>> from flowrl.connectors import DatasetWriter
>>> from flowrl.plan import Plan
>>> from flowrl.sample_batch import SampleBatch
>>> path = tempfile.mkdtemp()
>>> with DatasetWriter(path) as w:
...     w.write(SampleBatch({"obs": np.zeros((100, 3), np.float32), "actions": np.arange(100)}))
>>> with Plan(DatasetInput(path, ["obs", "actions"], batch_size=32, seed=0)) as plan:
...     result = plan.step()
>>> len(result["output"]), result["num_rows_read"]
(32, 32)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from flowrl.connectors.input import Dataset, DatasetError, locate
from flowrl.returns import discounted_returns
from flowrl.sample_batch import SampleBatch
from flowrl.stream import Stream, _wrap_error


class DatasetInput(Stream[SampleBatch]):
    """Batches of `batch_size` rows of `columns`, shuffled through `shuffle_buffer_size` rows,
    repeated for `num_epochs` (None: forever). `dataset` is a path, glob, list, `minari:ID`,
    or an opened `Dataset`."""

    def __init__(self, dataset: Any, columns: Sequence[str], batch_size: int, shuffle_buffer_size: int = 50_000,
                 seed: int | None = None, num_epochs: int | None = None, name: str = "DatasetInput"):
        super().__init__(name)
        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
        self.dataset.check(columns)
        self.columns = list(columns)
        self.batch_size = batch_size
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.num_epochs = num_epochs

    def _batches(self, executor) -> Iterator[SampleBatch]:
        if getattr(executor, "name", "local") == "ray" and self.dataset.format == "parquet":
            return ray_data_batches(self.dataset, self.columns, self.batch_size, self.shuffle_buffer_size,
                                    self.seed, self.num_epochs)
        return self.dataset.batches(self.columns, self.batch_size, self.shuffle_buffer_size, self.seed,
                                    self.num_epochs)

    def _iterate(self, ctx):
        counters = ctx.counters
        it = self._batches(ctx.executor)
        try:
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    return
                except DatasetError:
                    raise
                except Exception as e:
                    raise _wrap_error(self.name, e) from e
                counters["num_env_steps_sampled"] += len(batch)
                counters["num_rows_read"] += len(batch)
                yield batch
        finally:
            it.close()


def ray_data_batches(dataset: Dataset, columns: list[str], batch_size: int, shuffle_buffer_size: int,
                     seed: int | None, num_epochs: int | None) -> Iterator[SampleBatch]:
    """The same batches through Ray Data: files are read by Ray tasks wherever the cluster has
    CPUs, blocks stream to this process, and Ray Data's local shuffle buffer mixes rows."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    spaces = {k: v for k, v in dataset.spaces.items() if k in columns}
    filesystem, paths = _one_filesystem(dataset)
    epoch = 0
    while num_epochs is None or epoch < num_epochs:
        ds = ray.data.read_parquet(paths, filesystem=filesystem, columns=columns, shuffle="files")
        for table in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                     local_shuffle_buffer_size=max(shuffle_buffer_size, batch_size),
                                     local_shuffle_seed=None if seed is None else seed + epoch):
            batch = SampleBatch.from_arrow(table)
            yield SampleBatch(batch.to_numpy(), spaces) if spaces and not batch.spaces else batch
        epoch += 1


def _one_filesystem(dataset: Dataset) -> tuple[Any, list[str]]:
    """The filesystem (None: local) and paths Ray Data reads the dataset's files from; Ray Data
    takes one filesystem for all of them."""
    located = [locate(f) for f in dataset.files]
    kinds = {type(fs).__name__ if fs is not None else "local" for fs, _ in located}
    if len(kinds) > 1:
        raise DatasetError(f"{dataset.where}: the Ray executor reads a dataset from one filesystem, "
                           f"but its files are on {', '.join(sorted(kinds))}")
    return located[0][0], [path for _, path in located]


# ---- whole episodes ------------------------------------------------------------------------------
class EpisodeReturns:
    """Discounted returns-to-go of every row of a dataset, looked up by (eps_id, t) in any row
    order (after shuffling). Built in one pass over the eps_id, t, rewards and terminateds
    columns (24 bytes per row in memory). An episode the dataset holds only part of is
    summed over the rows it has.

    >>> ret = EpisodeReturns(np.array([7, 7, 7, 9]), np.array([0, 1, 2, 0]), np.ones(4), gamma=0.5)
    >>> ret.lookup(np.array([9, 7, 7]), np.array([0, 2, 0])).tolist()
    [1.0, 1.0, 1.75]
    """

    def __init__(self, eps_id: np.ndarray, t: np.ndarray, rewards: np.ndarray, gamma: float,
                 terminateds: np.ndarray | None = None):
        order = np.lexsort((t, eps_id))
        eps, t, rewards = eps_id[order], t[order], rewards[order]
        new_episode = np.ones(len(eps), dtype=bool)
        new_episode[1:] = eps[1:] != eps[:-1]
        starts = np.flatnonzero(new_episode)
        steps_ok = np.ones(len(eps), dtype=bool)
        steps_ok[1:] = new_episode[1:] | (t[1:] == t[:-1] + 1)
        if not steps_ok.all():
            bad = int(np.flatnonzero(~steps_ok)[0])
            raise DatasetError(f"episode {int(eps[bad])}: time steps are not consecutive (t={int(t[bad - 1])} "
                               f"then t={int(t[bad])}), or a (eps_id, t) row appears twice")
        ends = np.zeros(len(eps), dtype=bool)
        ends[starts[1:] - 1] = True
        ends[-1] = True
        self.values = discounted_returns(rewards, np.zeros(len(eps)), ends, ends, gamma)
        self.episode_ids = eps[starts]
        self.first_t = t[starts]
        self.starts = starts

    @classmethod
    def from_dataset(cls, dataset: Dataset, gamma: float) -> "EpisodeReturns":
        dataset.check(["eps_id", "t", "rewards"])
        parts = list(dataset.scan(["eps_id", "t", "rewards"]))
        cols = {k: np.concatenate([p[k] for p in parts]) for k in ("eps_id", "t", "rewards")}
        return cls(cols["eps_id"], cols["t"], cols["rewards"], gamma)

    def lookup(self, eps_id: np.ndarray, t: np.ndarray) -> np.ndarray:
        episode = np.searchsorted(self.episode_ids, eps_id)
        return self.values[self.starts[episode] + (t - self.first_t[episode])].astype(np.float32)


def complete_episodes(dataset: Dataset, columns: Sequence[str], max_episodes: int) -> dict[str, np.ndarray]:
    """Up to `max_episodes` episodes that end (terminated or truncated) inside the dataset, read
    in file order, as columns sorted by (eps_id, t): what off-policy estimates need."""
    needed = list(dict.fromkeys([*columns, "eps_id", "t", "terminateds", "truncateds"]))
    dataset.check(needed)
    parts: list[dict[str, np.ndarray]] = []
    finished: set[int] = set()
    for cols in dataset.scan(needed):
        parts.append(cols)
        ends = cols["terminateds"] | cols["truncateds"]
        finished.update(int(e) for e in cols["eps_id"][ends])
        if len(finished) >= max_episodes:
            break
    cols = {k: np.concatenate([p[k] for p in parts]) for k in needed}
    keep = np.isin(cols["eps_id"], np.array(sorted(finished), dtype=cols["eps_id"].dtype))
    cols = {k: v[keep] for k, v in cols.items()}
    order = np.lexsort((cols["t"], cols["eps_id"]))
    cols = {k: v[order] for k, v in cols.items()}
    # Only episodes held from their first step (a dataset may be a later part of a recording).
    eps = cols["eps_id"]
    new = np.ones(len(eps), dtype=bool)
    new[1:] = eps[1:] != eps[:-1]
    whole = eps[new][cols["t"][new] == 0][:max_episodes]
    keep = np.isin(eps, whole)
    return {k: v[keep] for k, v in cols.items()}


def spaces_for(dataset: Dataset, env_spaces: dict[str, gym.Space] | None) -> dict[str, gym.Space]:
    """The spaces to train with: the env's when one is named (checked against the dataset's
    columns), else those in the dataset's metadata."""
    if env_spaces:
        dataset.check([], env_spaces)
        return env_spaces
    if "obs" not in dataset.spaces or "actions" not in dataset.spaces:
        raise DatasetError(f"{dataset.where}: the dataset's schema metadata has no spaces for obs and actions; "
                           "name the env the data comes from (env: ...)")
    return dataset.spaces
