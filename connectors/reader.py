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

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
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
        if getattr(executor, "name", "local") == "ray" and self.dataset.format == "parquet" and \
                getattr(self.dataset, "ray_readable", True):
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
                self._count(counters, batch)
                yield batch
        finally:
            it.close()

    @staticmethod
    def _count(counters, batch: SampleBatch) -> None:
        counters["num_env_steps_sampled"] += len(batch)
        counters["num_rows_read"] += len(batch)


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
class EpisodeIdError(DatasetError):
    """Rows that cannot be one episode share an eps_id (`eps_id` names it)."""

    def __init__(self, eps_id: int, problem: str):
        self.eps_id = eps_id
        super().__init__(f"eps_id {eps_id}: {problem}")


def episode_breaks(eps: np.ndarray, t: np.ndarray, ended: np.ndarray | None = None):
    """Over rows sorted by (eps_id, t), where row i+1 cannot follow row i in one episode:
    masks (repeated, gap, after_end) of length n - 1 for the same (eps_id, t) twice, a jump
    in t, and a row after one that ended the episode (`ended`: terminated or truncated)."""
    same = eps[1:] == eps[:-1]
    repeated = same & (t[1:] == t[:-1])
    gap = same & (t[1:] != t[:-1] + 1) & ~repeated
    after_end = same & ended[:-1] if ended is not None else np.zeros_like(same)
    return repeated, gap, after_end


def check_episodes(eps: np.ndarray, t: np.ndarray, ended: np.ndarray | None = None) -> None:
    """EpisodeIdError unless rows sorted by (eps_id, t) make whole runs of steps (see
    `episode_breaks`). Recordings by several runs of a flowrl whose ids restarted at 0 share
    ids; this is where that shows."""
    repeated, gap, after_end = episode_breaks(eps, t, ended)
    bad = repeated | gap | after_end
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    shared = "so two episodes share this id (separate recordings whose ids both start at 0?); read one at a time"
    if repeated[i]:
        problem = f"the step t={int(t[i])} appears twice, {shared}"
    elif after_end[i]:
        problem = f"rows go on after the episode ended at t={int(t[i])}, {shared}"
    else:
        problem = f"time steps are not consecutive (t={int(t[i])} then t={int(t[i + 1])}): rows are missing"
    raise EpisodeIdError(int(eps[i]), problem)


@contextlib.contextmanager
def _naming_files(dataset: Dataset):
    """An EpisodeIdError becomes a DatasetError that names the files holding the id (read
    again for this: only on the way to an error)."""
    try:
        yield
    except EpisodeIdError as e:
        files = [c.file for c in dataset.chunks
                 if np.any(dataset.read(c, ["eps_id"]).column("eps_id").to_numpy() == e.eps_id)]
        files = list(dict.fromkeys(files)) or [dataset.where]
        where = ", ".join(files[:3]) + (f" (and {len(files) - 3} more files)" if len(files) > 3 else "")
        raise DatasetError(f"{where}: {e}") from None


def check_episode_ids(dataset: Dataset) -> None:
    """`check_episodes` over a whole dataset, in one pass over its eps_id, t and end-flag
    columns; the DatasetError names the files that hold the id."""
    columns = [c for c in ("eps_id", "t", "terminateds", "truncateds") if c in dataset.columns]
    if "eps_id" not in columns or "t" not in columns:
        return
    parts = list(dataset.scan(columns))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in columns}
    order = np.lexsort((cols["t"], cols["eps_id"]))
    flags = [cols[k][order] for k in ("terminateds", "truncateds") if k in cols]
    with _naming_files(dataset):
        check_episodes(cols["eps_id"][order], cols["t"][order], np.logical_or.reduce(flags) if flags else None)


class EpisodeReturns:
    """Discounted returns-to-go of every row of a dataset, looked up by (eps_id, t) in any row
    order (after shuffling). An episode that the dataset holds without its termination
    (truncated by a time limit, or cut where the recording stops) bootstraps from the value
    of the state after its last row, as RLlib's MARWIL does:

        R_t = sum_{k=t}^{T-1} gamma^(k-t) r_k + gamma^(T-t) V(s_T)   (V(s_T) = 0 if terminated)

    with T-1 the episode's last row held and s_T that row's new_obs. V is the learner's
    current value function, so it is evaluated at lookup (`value`); kept are the reward sums
    (24 bytes per row) and the last new_obs of each episode that needs V.

    >>> ret = EpisodeReturns(np.array([7, 7, 7, 9]), np.array([0, 1, 2, 0]), np.ones(4), gamma=0.5,
    ...                      terminateds=np.array([False, False, False, True]), new_obs=np.arange(4.0)[:, None])
    >>> ret.lookup(np.array([9, 7, 7]), np.array([0, 2, 0]), value=lambda obs: 10 * obs[:, 0]).tolist()
    [1.0, 11.0, 4.25]
    """

    def __init__(self, eps_id: np.ndarray, t: np.ndarray, rewards: np.ndarray, gamma: float,
                 terminateds: np.ndarray | None = None, truncateds: np.ndarray | None = None,
                 new_obs: np.ndarray | None = None):
        """Columns per row, in any order. `terminateds` None: every episode terminates at its
        last row. `new_obs` may instead be given later, a part at a time, to `add_final_obs`."""
        order = np.lexsort((t, eps_id))
        eps, steps = eps_id[order], t[order]
        terminal = None if terminateds is None else np.asarray(terminateds, bool)[order]
        flags = [np.asarray(f, bool)[order] for f in (terminateds, truncateds) if f is not None]
        check_episodes(eps, steps, np.logical_or.reduce(flags) if flags else None)
        new_episode = np.ones(len(eps), dtype=bool)
        new_episode[1:] = eps[1:] != eps[:-1]
        starts = np.flatnonzero(new_episode)
        last = np.append(starts[1:] - 1, len(eps) - 1)
        ends = np.zeros(len(eps), dtype=bool)
        ends[last] = True
        # Sums of the rewards held; gamma^(T-t) V(s_T) is added at lookup.
        self.partial_returns = discounted_returns(rewards[order], np.zeros(len(eps)), ends, ends, gamma)
        self.gamma = gamma
        self.episode_ids = eps[starts]
        self.first_t = steps[starts]
        self.last_t = steps[last]
        self.starts = starts
        # Per episode: whether it needs V(s_T), and where its s_T is kept.
        self.bootstraps = np.zeros(len(starts), dtype=bool) if terminal is None else ~terminal[last]
        self.final_slot = np.cumsum(self.bootstraps) - 1
        self.final_obs: np.ndarray | None = None
        self._final_found = np.zeros(int(self.bootstraps.sum()), dtype=bool)
        if new_obs is not None:
            self.add_final_obs(eps_id, t, new_obs)

    @property
    def num_bootstrapped(self) -> int:
        """Episodes held without their termination (their returns need V)."""
        return len(self._final_found)

    def add_final_obs(self, eps_id: np.ndarray, t: np.ndarray, new_obs: np.ndarray) -> None:
        """Keeps, from these rows, the new_obs of the last row of each episode that needs V."""
        episode = np.minimum(np.searchsorted(self.episode_ids, eps_id), len(self.episode_ids) - 1)
        final = (self.episode_ids[episode] == eps_id) & self.bootstraps[episode] & (t == self.last_t[episode])
        if not final.any():
            return
        if self.final_obs is None:
            self.final_obs = np.zeros((self.num_bootstrapped, *new_obs.shape[1:]), dtype=new_obs.dtype)
        slots = self.final_slot[episode[final]]
        self.final_obs[slots] = new_obs[final]
        self._final_found[slots] = True

    @classmethod
    def from_dataset(cls, dataset: Dataset, gamma: float) -> "EpisodeReturns":
        """Two passes when some episode needs V: the scalar columns, then new_obs for the last
        rows of those episodes."""
        columns = ["eps_id", "t", "rewards", "terminateds"]
        dataset.check(columns)
        columns += ["truncateds"] if "truncateds" in dataset.columns else []
        parts = list(dataset.scan(columns))
        cols = {k: np.concatenate([p[k] for p in parts]) for k in columns}
        del parts
        with _naming_files(dataset):
            returns = cls(cols["eps_id"], cols["t"], cols["rewards"], gamma, cols["terminateds"],
                          cols.get("truncateds"))
        if returns.num_bootstrapped:
            if "new_obs" not in dataset.columns:
                raise DatasetError(f"{dataset.where}: {returns.num_bootstrapped} episode(s) end without terminating "
                                   "(truncated, or cut where the recording stops); their returns-to-go bootstrap "
                                   "from V(new_obs), but the dataset has no 'new_obs' column")
            for part in dataset.scan(["eps_id", "t", "new_obs"]):
                returns.add_final_obs(part["eps_id"], part["t"], part["new_obs"])
        return returns

    def lookup(self, eps_id: np.ndarray, t: np.ndarray, value: Callable[[np.ndarray], np.ndarray] | None = None
               ) -> np.ndarray:
        """R_t of the rows (eps_id, t); `value(observations) -> V` is called once, on the
        final new_obs of the episodes among these rows that need it."""
        episode = np.searchsorted(self.episode_ids, eps_id)
        returns = self.partial_returns[self.starts[episode] + (t - self.first_t[episode])].astype(np.float64)
        needs = self.bootstraps[episode]
        if needs.any():
            if value is None:
                raise ValueError("these rows' episodes end without terminating: lookup needs `value`")
            if not self._final_found.all():
                raise ValueError("the new_obs of some episode's last row was never given to add_final_obs")
            slots, which = np.unique(self.final_slot[episode[needs]], return_inverse=True)
            final_values = np.asarray(value(self.final_obs[slots]), dtype=np.float64)[which]
            returns[needs] += self.gamma ** (self.last_t[episode[needs]] - t[needs] + 1) * final_values
        return returns.astype(np.float32)


def complete_episodes(dataset: Dataset, columns: Sequence[str], max_episodes: int) -> dict[str, np.ndarray]:
    """Up to `max_episodes` episodes that end (terminated or truncated) inside the dataset, read
    in file order, as columns sorted by (eps_id, t): what off-policy estimates need. Ids that
    two episodes share are refused (DatasetError naming the files)."""
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
    eps = cols["eps_id"]
    with _naming_files(dataset):
        check_episodes(eps, cols["t"], cols["terminateds"] | cols["truncateds"])
    # Only episodes held from their first step (a dataset may be a later part of a recording).
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
