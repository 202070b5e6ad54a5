"""Experience replay for off-policy plans: a ReplayBuffer of rows (transitions) in preallocated
numpy columns, with n-step returns computed at insertion and optional prioritized sampling, and
the operators around it: StoreToReplayBuffer, Replay, UpdatePriorities. MixInReplay (IMPALA's
replay of whole on-policy batches) keeps its own BatchReplayBuffer.

A stored row is the n-step transition of one env step t:
    obs = s_t,  actions = a_t,  rewards = sum_{k<m} gamma^k r_{t+k},  new_obs = s_{t+m},
    terminateds = the episode terminated at step t+m-1,  discounts = gamma^m,
with m = n, or fewer where the episode ends first, so the target a learner forms is
    rewards + discounts * (1 - terminateds) * Q_target(new_obs).
An episode cut by truncation bootstraps from its last new_obs; one ended by termination does
not. Rows whose next n - 1 steps are still to come (the fragment ended mid-episode) wait, per
`eps_id`, for the next add(): cutting a trajectory into fragments does not change what is
stored.

>>> import gymnasium as gym
>>> buf = ReplayBuffer(capacity=100, n_step=2, gamma=0.5, seed=0)
>>> buf.add(SampleBatch({"obs": np.arange(3.0)[:, None], "actions": np.zeros(3, np.int64),
...                      "rewards": np.ones(3, np.float32), "new_obs": np.arange(1.0, 4.0)[:, None],
...                      "terminateds": np.array([False, False, True]), "truncateds": np.zeros(3, bool),
...                      "eps_id": np.zeros(3, np.int64), "t": np.arange(3)}))
3
>>> rows = buf.get(np.arange(3))
>>> rows["rewards"].tolist(), rows["new_obs"][:, 0].tolist(), rows["discounts"].tolist()
([1.5, 1.5, 1.0], [2.0, 3.0, 3.0], [0.25, 0.25, 0.5])
>>> rows["terminateds"].tolist()
[False, True, True]
"""

from __future__ import annotations

import math
import os
import threading
import time
import zlib
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import gymnasium as gym
import numpy as np

from flowrl.config import check_schedule, schedule_value
from flowrl.multi_agent_batch import MultiAgentBatch
from flowrl.operators.concurrency import as_fraction
from flowrl.returns import n_step_sums
from flowrl.sample_batch import BatchLayout, SampleBatch
from flowrl.segment_tree import MinTree, SumTree, update_together
from flowrl.spaces import action_row_layout, decode_spaces, encode_spaces, obs_row_layout
from flowrl.stream import FlatMap, Map, OperatorError, PlanStructureError, Stream

# What a stored row holds, and what sample() adds to it.
STORED_COLUMNS = ("obs", "actions", "rewards", "new_obs", "terminateds", "discounts")
SAMPLED_COLUMNS = STORED_COLUMNS + ("weights", "batch_indexes")
# What add() reads from a batch: n-step returns need the trajectory columns too.
_ONE_STEP_INPUT = ("obs", "actions", "rewards", "new_obs", "terminateds")
_N_STEP_INPUT = _ONE_STEP_INPUT + ("truncateds", "eps_id", "t")
_STATE_VERSION = 1
DEFAULT_BETA = 0.4   # Schaul et al.'s beta_0 for proportional prioritization


def _tree_nbytes(capacity: int) -> int:
    """A sum tree and a min tree: 2 * P float64 nodes each, P = capacity rounded up to 2^k."""
    return 2 * 2 * (1 << max(int(capacity - 1).bit_length(), 0)) * 8


def format_nbytes(nbytes: int) -> str:
    """A size for people, in decimal units.

    >>> format_nbytes(2_822_400_000), format_nbytes(640)
    ('2.82 GB', '640 B')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"
    return f"{int(nbytes)} B"


def available_memory() -> int | None:
    """Bytes of memory this process could still get: /proc/meminfo's MemAvailable (else the
    free physical pages), capped by a cgroup v2 limit when there is one; None if unknown."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's limit is what counts, when it is lower
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return available


def check_replay_memory(capacity: int, spaces: Mapping[str, gym.Space], prioritized: bool = False) -> int:
    """The bytes a ReplayBuffer of `capacity` rows will preallocate for `spaces` ("obs" and
    "actions"); raises ValueError (one line) when that is more than the memory available.

    >>> import gymnasium as gym
    >>> spaces = {"obs": gym.spaces.Box(0, 255, (84, 84, 4), np.uint8), "actions": gym.spaces.Discrete(4)}
    >>> format_nbytes(check_replay_memory(1000, spaces))
    '56.5 MB'
    >>> check_replay_memory(10**9, spaces)
    Traceback (most recent call last):
    ...
    ValueError: replay_buffer_capacity 1,000,000,000 rows needs 56,465 GB of memory for its columns, but only ...
    """
    nbytes = ReplayBuffer.estimate_nbytes(capacity, spaces, prioritized)
    available = available_memory()
    if available is not None and nbytes > available:
        raise ValueError(f"replay_buffer_capacity {capacity:,} rows needs {format_nbytes(nbytes)} of memory for its "
                         f"columns, but only {format_nbytes(available)} is available; lower the capacity")
    return nbytes


def _by_agent(batch: SampleBatch) -> SampleBatch:
    """A policy batch whose eps_id tells its agents' trajectories apart: agents of one policy
    share their episode's id, and n-step sums must not run from one agent's steps into
    another's. Agent 0 keeps the episode id; agent k's is xor-ed with k times an odd 64-bit
    constant (the golden ratio's, as hash combiners use), so ids of agents never meet."""
    if "agent_id" not in batch or "eps_id" not in batch:
        return batch
    mix = batch["agent_id"].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return batch.with_columns(eps_id=(batch["eps_id"].astype(np.uint64) ^ mix).view(np.int64))


class ReplayBuffer:
    """A ring of `capacity` rows (transitions) in preallocated numpy columns; once full, the
    oldest rows are overwritten. See the module docstring for what a row holds.

    Columns are allocated on the first add() from that batch's dtypes and shapes (`nbytes`
    then says how much; `estimate_nbytes` says it before, from the spaces). Sampling draws
    rows with replacement, uniformly, or with `prioritized` in proportion to p_i^alpha where
    p_i = |td_i| + eps (Schaul et al. 2016); new rows get the largest p seen so far, and each
    row's importance weight is (N * P(i))^-beta normalized by the largest weight. add(),
    sample() and update_priorities() may be called from different threads.

    >>> buf = ReplayBuffer(capacity=2, seed=0)
    >>> one_step = {"actions": np.zeros(3, np.int64), "rewards": np.array([1.0, 2.0, 3.0], np.float32),
    ...             "terminateds": np.zeros(3, bool)}
    >>> buf.add(SampleBatch({"obs": np.zeros((3, 1)), "new_obs": np.ones((3, 1)), **one_step}))
    3
    >>> len(buf), sorted(buf.sample(8)["rewards"].tolist())[0]   # the first row was overwritten
    (2, 2.0)
    """

    def __init__(self, capacity: int, n_step: int = 1, gamma: float = 0.99, prioritized: bool = False,
                 alpha: float = 0.6, eps: float = 1e-6, seed: int | None = None):
        if not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"replay buffer capacity must be an integer >= 1, got {capacity!r}")
        if not isinstance(n_step, (int, np.integer)) or n_step < 1:
            raise ValueError(f"n_step must be an integer >= 1, got {n_step!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if alpha < 0.0 or eps <= 0.0:
            raise ValueError(f"prioritized replay needs alpha >= 0 and eps > 0, got alpha={alpha}, eps={eps}")
        self.capacity, self.n_step, self.gamma = int(capacity), int(n_step), float(gamma)
        self.prioritized, self.alpha, self.eps = bool(prioritized), float(alpha), float(eps)
        self._rng = np.random.default_rng(seed)
        self._columns: dict[str, np.ndarray] | None = None
        self._layout: BatchLayout | None = None
        self._spaces: dict[str, gym.Space] = {}
        self._position = 0     # the slot the next row goes to
        self._size = 0
        # n-step: input rows of episodes whose next steps have not arrived yet, by column.
        self._pending: dict[str, np.ndarray] | None = None
        self._max_priority = 1.0
        if self.prioritized:
            self._sum_tree, self._min_tree = SumTree(self.capacity), MinTree(self.capacity)
        self._cond = threading.Condition()
        self._last_add_thread: int | None = None
        self._seed = seed
        # Multi-agent: a buffer per policy (made as its rows first arrive), sharing this one's lock.
        self.policy_buffers: dict[str, ReplayBuffer] = {}
        self.count_steps_by = "env_steps"   # what the stored MultiAgentBatches count (schedules follow it)

    # ---- sizes ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    @property
    def num_pending(self) -> int:
        """Rows held back until their next n - 1 steps arrive (n_step > 1)."""
        return 0 if self._pending is None else len(self._pending["obs"])

    @property
    def priorities(self) -> np.ndarray:
        """p_i^alpha of each stored row, by slot (a prioritized buffer's sum-tree leaves)."""
        if not self.prioritized:
            raise ValueError("a uniform replay buffer has no priorities")
        return np.array(self._sum_tree.values[:self._size])

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated columns (and priority trees); 0 before the first add()."""
        if self._columns is None:
            return 0
        trees = _tree_nbytes(self.capacity) if self.prioritized else 0
        return sum(c.nbytes for c in self._columns.values()) + trees

    @staticmethod
    def estimate_nbytes(capacity: int, spaces: Mapping[str, gym.Space], prioritized: bool = False) -> int:
        """What `nbytes` will be for rows sampled from `spaces` ("obs" and "actions", as
        WorkerSet.spaces gives them), before anything is allocated.

        >>> import gymnasium as gym
        >>> cartpole = {"obs": gym.spaces.Box(-1, 1, (4,)), "actions": gym.spaces.Discrete(2)}
        >>> ReplayBuffer.estimate_nbytes(1000, cartpole)   # obs + new_obs 2*16, action 8, 4 + 1 + 4
        49000

        Multi-agent spaces, {policy id: spaces}, count a buffer per policy:

        >>> ReplayBuffer.estimate_nbytes(1000, {"red": cartpole, "blue": cartpole})
        98000
        """
        if spaces and all(isinstance(s, Mapping) for s in spaces.values()):
            return sum(ReplayBuffer.estimate_nbytes(capacity, s, prioritized) for s in spaces.values())
        missing = [k for k in ("obs", "actions") if k not in spaces]
        if missing:
            raise ValueError(f"estimate_nbytes needs the spaces of {missing}; got {sorted(spaces)}")
        (obs_shape, obs_dtype), (act_shape, act_dtype) = obs_row_layout(spaces["obs"]), action_row_layout(spaces["actions"])
        obs = math.prod(obs_shape) * obs_dtype.itemsize
        row = 2 * obs + math.prod(act_shape) * act_dtype.itemsize + 4 + 1 + 4   # rewards, terminateds, discounts
        return capacity * row + (_tree_nbytes(capacity) if prioritized else 0)

    # ---- adding -----------------------------------------------------------------------------
    def policy_buffer(self, policy_id: str) -> "ReplayBuffer":
        """Multi-agent: the buffer of one policy's rows, with this buffer's settings (made on
        first use, its seed drawn from this one's and the policy id). Policies' rows never mix:
        each has its own ring, priorities and n-step rows pending."""
        buffer = self.policy_buffers.get(policy_id)
        if buffer is None:
            seed = None if self._seed is None else [int(self._seed), zlib.crc32(policy_id.encode())]
            buffer = ReplayBuffer(self.capacity, self.n_step, self.gamma, self.prioritized, self.alpha, self.eps, seed)
            buffer._cond = self._cond   # Replay waits on this buffer for rows of any policy
            self.policy_buffers[policy_id] = buffer
        return buffer

    def add(self, batch: SampleBatch | MultiAgentBatch) -> int:
        """Store the rows of `batch` (columns obs, actions, rewards, new_obs, terminateds, and
        for n_step > 1 truncateds, eps_id and t; others are ignored). Returns the number of
        rows stored now; with n_step > 1 the last n - 1 rows of an episode still running wait
        for the next add(). A MultiAgentBatch's policy batches each go to their policy's buffer
        (`policy_buffer`); there, a trajectory is one agent's (eps_id and agent_id)."""
        if isinstance(batch, MultiAgentBatch):
            with self._cond:
                self.count_steps_by = batch.count_steps_by
                stored = sum(self.policy_buffer(pid).add(_by_agent(b) if self.n_step > 1 else b)
                             for pid, b in batch.policy_batches.items())
                self._last_add_thread = threading.get_ident()
            return stored
        inputs = _N_STEP_INPUT if self.n_step > 1 else _ONE_STEP_INPUT
        missing = [k for k in inputs if k not in batch]
        if missing:
            raise ValueError(f"ReplayBuffer.add: the batch has no column(s) {missing}"
                             f"{' (needed for n_step > 1)' if self.n_step > 1 else ''}; columns are {batch.columns}")
        with self._cond:
            if self._columns is None:
                if len(batch) == 0:
                    return 0
                self._allocate({k: batch[k] for k in inputs}, batch.spaces)
            self._check_layout(batch)
            if self.n_step == 1:
                rows = {"obs": batch["obs"], "actions": batch["actions"], "rewards": batch["rewards"],
                        "new_obs": batch["new_obs"], "terminateds": batch["terminateds"],
                        "discounts": np.full(len(batch), self.gamma, np.float32)}
            else:
                rows = self._n_step_rows({k: batch[k] for k in inputs})
            stored = self._write(rows)
            self._last_add_thread = threading.get_ident()
            self._cond.notify_all()
        return stored

    def _allocate(self, example: dict[str, np.ndarray], spaces: dict[str, gym.Space]) -> None:
        rows = {"obs": example["obs"], "actions": example["actions"], "rewards": np.zeros(0, np.float32),
                "new_obs": example["new_obs"], "terminateds": np.zeros(0, bool), "discounts": np.zeros(0, np.float32)}
        # np.zeros takes the pages from the OS only as rows are written.
        self._columns = {k: np.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in rows.items()}
        self._spaces = {k: s for k, s in spaces.items() if k in STORED_COLUMNS}
        self._make_layout()

    def _make_layout(self) -> None:
        example = {k: v[:0] for k, v in self._columns.items()}
        example.update(weights=np.zeros(0, np.float32), batch_indexes=np.zeros(0, np.int64))
        self._layout = BatchLayout(example, self._spaces)

    def _check_layout(self, batch: SampleBatch) -> None:
        for name in ("obs", "new_obs", "actions"):
            have, got = self._columns[name], batch[name]
            if got.dtype != have.dtype or got.shape[1:] != have.shape[1:]:
                raise ValueError(f"ReplayBuffer.add: column {name!r} is {got.dtype}{list(got.shape[1:])}, but the "
                                 f"buffer holds {have.dtype}{list(have.shape[1:])} (from the first batch added)")

    def _n_step_rows(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The n-step transitions that are complete once `cols` joins the rows still pending;
        the rest become the new pending rows. The work is done on index arrays; each row of
        the large columns (observations) is copied once, from wherever it is."""
        pending, self._pending = self._pending or {}, None

        def joined(name: str) -> np.ndarray:   # pending rows first, then the batch's
            return np.concatenate([pending[name], cols[name]]) if pending else cols[name]

        def take(name: str, rows: np.ndarray) -> np.ndarray:   # rows of joined(name), without joining
            if not pending:
                return cols[name].take(rows, axis=0)
            # Every row from the batch in one gather (pending rows point at its row 0 for now),
            # then the few pending ones put in place.
            first = len(pending[name])
            if not len(cols[name]):
                return pending[name].take(rows, axis=0)
            out = cols[name].take(np.maximum(rows - first, 0), axis=0)
            old = np.flatnonzero(rows < first)
            if len(old):
                out[old] = pending[name].take(rows[old], axis=0)
            return out

        # Group each episode's rows, in arrival order (the pending ones first): a batch lays its
        # sub-envs out one after another, and batches of several workers arrive interleaved.
        eps = joined("eps_id")
        order = np.argsort(eps, kind="stable")
        eps, t = eps[order], joined("t")[order]
        rewards = joined("rewards")[order]
        terminated = joined("terminateds").astype(bool, copy=False)[order]
        truncated = joined("truncateds").astype(bool, copy=False)[order]
        N = len(eps)
        same_episode = np.zeros(N, dtype=bool)
        same_episode[:-1] = eps[1:] == eps[:-1]
        continues = same_episode.copy()           # the next row is the next step of this episode
        continues[:-1] &= t[1:] == t[:-1] + 1
        # Where the trajectory we hold stops for good: the episode ended, or the same episode
        # id goes on at another step (rows lost, or a restarted worker reusing ids); what stops
        # only because later steps have not arrived yet is still open.
        closed = terminated | truncated | (same_episode & ~continues)
        sums, steps = n_step_sums(rewards, ~continues | closed, self.gamma, self.n_step)
        last = np.arange(N) + steps - 1           # the row whose new_obs is s_{t+m}
        complete = (steps == self.n_step) | closed[last]
        done = np.flatnonzero(complete)
        ends = last[done]
        waiting = order[~complete]
        if len(waiting):
            self._pending = {name: take(name, waiting) for name in cols}
        return {"obs": take("obs", order[done]), "actions": take("actions", order[done]), "rewards": sums[done],
                "new_obs": take("new_obs", order[ends]), "terminateds": terminated[ends],
                "discounts": (self.gamma ** steps[done]).astype(np.float32)}

    def _write(self, rows: dict[str, np.ndarray]) -> int:
        k = len(rows["obs"])
        if k == 0:
            return 0
        skip = max(k - self.capacity, 0)          # more rows than slots: only the last ones stay
        start = (self._position + skip) % self.capacity
        n = k - skip
        first = min(n, self.capacity - start)     # up to the end of the ring, then from slot 0
        for name, column in self._columns.items():
            data = rows[name][skip:]
            column[start:start + first] = data[:first]
            column[:n - first] = data[first:]
        if self.prioritized:
            slots = (start + np.arange(n)) % self.capacity
            update_together([self._sum_tree, self._min_tree], slots, self._max_priority ** self.alpha)
        self._position = (start + n) % self.capacity
        self._size = min(self._size + n, self.capacity)
        return k

    # ---- sampling ---------------------------------------------------------------------------
    def sample(self, batch_size: int, beta: float = DEFAULT_BETA) -> SampleBatch:
        """`batch_size` rows drawn with replacement, with columns obs, actions, rewards,
        new_obs, terminateds, discounts, weights (importance weights; all 1 when uniform) and
        batch_indexes (the rows' slots, for update_priorities)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        with self._cond:
            if self._size == 0:
                raise ValueError("cannot sample from an empty replay buffer")
            if not self.prioritized:
                return self._gather(self._rng.integers(0, self._size, batch_size), None)
            total = self._sum_tree.total()
            slots = self._sum_tree.find_prefix_sum(self._rng.random(batch_size) * total)
            slots = np.minimum(slots, self._size - 1)
            # w_i = (N P(i))^-beta / max_j w_j = (p_i / p_min)^-beta: the largest weight is the
            # rarest row's.
            weights = (self._sum_tree[slots] / self._min_tree.min()) ** -beta
            return self._gather(slots, weights.astype(np.float32))

    def get(self, batch_indexes: np.ndarray) -> SampleBatch:
        """The rows in slots `batch_indexes` (0 <= i < len(self)), laid out as sample() lays
        them out, with weights 1."""
        slots = np.asarray(batch_indexes, dtype=np.int64).reshape(-1)
        with self._cond:
            if len(slots) and (slots.min() < 0 or slots.max() >= self._size):
                raise IndexError(f"replay buffer slots must be in [0, {self._size})")
            return self._gather(slots, None)

    def _gather(self, slots: np.ndarray, weights: np.ndarray | None) -> SampleBatch:
        # take() gathers rows two to three times faster than fancy indexing does.
        columns = {name: column.take(slots, axis=0) for name, column in self._columns.items()}
        columns["weights"] = np.ones(len(slots), np.float32) if weights is None else weights
        columns["batch_indexes"] = slots.astype(np.int64, copy=False)
        return self._layout.batch(columns)

    def update_priorities(self, batch_indexes: np.ndarray, td_errors: np.ndarray) -> None:
        """Set p_i = |td_i| + eps for the sampled rows (priority p_i^alpha). Where a slot is
        repeated, its last td error wins. Slots refilled since they were sampled take the
        priority meant for the old row (as in RLlib). A uniform buffer ignores the call."""
        if not self.prioritized:
            return
        slots = np.asarray(batch_indexes, dtype=np.int64).reshape(-1)
        td = np.asarray(td_errors, dtype=np.float64).reshape(-1)
        if slots.shape != td.shape:
            raise ValueError(f"update_priorities: {len(slots)} batch_indexes but {len(td)} td_errors")
        if not np.all(np.isfinite(td)):
            raise ValueError("update_priorities: td_errors contain NaN or inf")
        if not len(slots):
            return
        with self._cond:
            if slots.min() < 0 or slots.max() >= self._size:
                raise IndexError(f"update_priorities: batch_indexes must be in [0, {self._size})")
            priorities = np.abs(td) + self.eps
            self._max_priority = max(self._max_priority, float(priorities.max()))
            update_together([self._sum_tree, self._min_tree], slots, priorities ** self.alpha)

    # ---- waiting (for Replay) ----------------------------------------------------------------
    def wait_for(self, rows: int, timeout: float) -> bool:
        """Wait up to `timeout` s until at least `rows` rows are stored (multi-agent: in some
        policy's buffer); True if they are."""
        with self._cond:
            if not self.holds(rows):
                if self._last_add_thread == threading.get_ident():
                    raise PlanStructureError(
                        f"a Replay stream waits for {rows} rows in the thread that stores into its buffer, "
                        "so it would wait forever; run the store and replay streams with Concurrently")
                self._cond.wait(timeout)
            return self.holds(rows)

    def holds(self, rows: int) -> bool:
        """Whether `rows` rows are stored: in this buffer, or in one of its policy buffers."""
        with self._cond:   # a policy buffer may be added meanwhile
            return self._size >= rows or any(len(b) >= rows for b in self.policy_buffers.values())

    # ---- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """The buffer as numpy arrays only (np.savez(..., **state), then np.load with
        allow_pickle=False): stored rows, ring position, priorities, the rows still waiting
        for their n-step returns, and the sampling generator's state."""
        with self._cond:
            out = {"version": np.array(_STATE_VERSION), "capacity": np.array(self.capacity),
                   "n_step": np.array(self.n_step), "gamma": np.array(self.gamma),
                   "position": np.array(self._position), "size": np.array(self._size),
                   "max_priority": np.array(self._max_priority),
                   "count_steps_by": np.array(self.count_steps_by)}   # Replay's beta schedule follows it
            if self._columns is not None:
                out["spaces"] = np.frombuffer(encode_spaces(self._spaces), dtype=np.uint8)
                for name, column in self._columns.items():
                    out[f"columns.{name}"] = column[:self._size].copy()
            if self.prioritized:
                out["priorities"] = np.array(self._sum_tree.values[:self._size])
            if self._pending is not None:
                for name, column in self._pending.items():
                    out[f"pending.{name}"] = column.copy()
            rng = _rng_state(self._rng)
            if rng is not None:
                out["rng"] = rng
            if self.policy_buffers:  # multi-agent: each policy's under policy.<i>., i its place in policy_ids
                out["policy_ids"] = np.array(list(self.policy_buffers))
                for i, buffer in enumerate(self.policy_buffers.values()):
                    out.update({f"policy.{i}.{k}": v for k, v in buffer.state().items()})
            return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what state() saved, into a buffer built with the same capacity, n_step and
        gamma. A prioritized buffer restored from a uniform one gives every row priority 1."""
        def scalar(key):
            if key not in state:
                raise ValueError(f"replay buffer state has no {key!r}")
            return np.asarray(state[key]).item()

        if scalar("version") != _STATE_VERSION:
            raise ValueError(f"replay buffer state version {scalar('version')} is not {_STATE_VERSION}")
        for key, mine in (("capacity", self.capacity), ("n_step", self.n_step), ("gamma", self.gamma)):
            if scalar(key) != mine:
                raise ValueError(f"replay buffer state has {key} {scalar(key)}, this buffer {mine}")
        size, position = int(scalar("size")), int(scalar("position"))
        in_range = 0 <= size <= self.capacity and 0 <= position < self.capacity
        if not in_range or (size < self.capacity and position != size):   # a ring not yet full fills in order
            raise ValueError(f"replay buffer state: size {size} / position {position} out of range")
        columns = {name: np.asarray(state[f"columns.{name}"]) for name in STORED_COLUMNS
                   if f"columns.{name}" in state}
        if columns and set(columns) != set(STORED_COLUMNS) or (size and not columns):
            raise ValueError(f"replay buffer state: columns {sorted(columns)}, expected {list(STORED_COLUMNS)}")
        if any(len(c) != size for c in columns.values()):
            raise ValueError(f"replay buffer state: columns do not all have {size} rows")
        pending = {k[len("pending."):]: np.asarray(v) for k, v in state.items() if k.startswith("pending.")}
        if pending and (set(pending) != set(_N_STEP_INPUT) or len({len(v) for v in pending.values()}) != 1):
            raise ValueError(f"replay buffer state: pending rows have columns {sorted(pending)} of lengths "
                             f"{sorted({len(v) for v in pending.values()})}, expected {list(_N_STEP_INPUT)}")
        policy_buffers = {}
        for i, pid in enumerate(np.asarray(state.get("policy_ids", [])).tolist()):
            policy_buffers[pid] = ReplayBuffer(self.capacity, self.n_step, self.gamma, self.prioritized, self.alpha,
                                               self.eps)
            prefix = f"policy.{i}."
            policy_buffers[pid].load_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        priorities = np.asarray(state["priorities"], dtype=np.float64) if "priorities" in state else np.ones(size)
        max_priority = float(scalar("max_priority"))
        count_steps_by = str(scalar("count_steps_by")) if "count_steps_by" in state else self.count_steps_by
        if count_steps_by not in ("env_steps", "agent_steps"):
            raise ValueError(f"replay buffer state: count_steps_by {count_steps_by!r} is not env_steps or agent_steps")
        if len(priorities) != size or not (np.all(np.isfinite(priorities)) and np.all(priorities > 0)) \
                or not (math.isfinite(max_priority) and max_priority > 0):
            raise ValueError(f"replay buffer state: priorities must be {size} finite values > 0 (and max_priority)")
        # Everything is checked before anything changes: a refused state leaves the buffer as it was.
        with self._cond:
            self._position, self._size = position, size
            self._max_priority = max_priority
            self.count_steps_by = count_steps_by
            self._pending = pending or None
            if columns:
                self._spaces = decode_spaces(np.asarray(state["spaces"]).tobytes()) if "spaces" in state else {}
                self._columns = {}
                for name in STORED_COLUMNS:
                    saved = columns[name]
                    self._columns[name] = np.zeros((self.capacity, *saved.shape[1:]), dtype=saved.dtype)
                    self._columns[name][:size] = saved
                self._make_layout()
            else:
                self._columns, self._layout, self._spaces = None, None, {}
            if self.prioritized:
                self._sum_tree.rebuild(priorities)
                self._min_tree.rebuild(priorities)
            if "rng" in state:
                _set_rng_state(self._rng, np.asarray(state["rng"]))
            for buffer in policy_buffers.values():
                buffer._cond = self._cond
            self.policy_buffers = policy_buffers

    def save(self, path) -> None:
        """state() into an .npz file (no pickle)."""
        np.savez(path, **self.state())

    def load(self, path) -> None:
        """load_state() from a file save() wrote; never unpickles."""
        with np.load(path, allow_pickle=False) as data:
            self.load_state({k: data[k] for k in data.files})


def _rng_state(rng: np.random.Generator) -> np.ndarray | None:
    """PCG64's 128-bit state and increment as four uint64 words (npz holds no Python ints)."""
    state = rng.bit_generator.state
    if state.get("bit_generator") != "PCG64":
        return None
    words = []
    for value in (state["state"]["state"], state["state"]["inc"]):
        words += [value >> 64, value & (2**64 - 1)]
    words += [state["has_uint32"], state["uinteger"]]
    return np.array(words, dtype=np.uint64)


def _set_rng_state(rng: np.random.Generator, words: np.ndarray) -> None:
    if rng.bit_generator.state.get("bit_generator") != "PCG64" or len(words) != 6:
        return
    w = [int(x) for x in words]
    rng.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": (w[0] << 64) | w[1],
                                                                   "inc": (w[2] << 64) | w[3]},
                               "has_uint32": w[4], "uinteger": w[5]}


# ---- operators ---------------------------------------------------------------------------------
def weights_for_training_intensity(training_intensity: float | None, rows_per_store_item: int,
                                   train_batch_size: int, store: str = "store",
                                   train: str = "train") -> dict[str, Fraction]:
    """Round-robin weights for Concurrently that train `training_intensity` rows per env step
    sampled (RLlib's meaning), when each item of the store stream holds `rows_per_store_item`
    env steps and each replayed batch `train_batch_size` rows: train_batch_size *
    replayed batches = training_intensity * rows stored, exactly in the long run. None: one
    replayed batch per stored item.

    >>> weights_for_training_intensity(8, rows_per_store_item=4, train_batch_size=32)
    {'store': Fraction(1, 1), 'train': Fraction(1, 1)}
    >>> weights_for_training_intensity(0.5, rows_per_store_item=200, train_batch_size=32)["train"]
    Fraction(25, 8)
    """
    if training_intensity is None:
        return {store: Fraction(1), train: Fraction(1)}
    if not training_intensity > 0:
        raise ValueError(f"training_intensity must be > 0, got {training_intensity}")
    if rows_per_store_item < 1 or train_batch_size < 1:
        raise ValueError(f"rows_per_store_item and train_batch_size must be >= 1, got {rows_per_store_item} "
                         f"and {train_batch_size}")
    return {store: Fraction(1), train: as_fraction(training_intensity) * rows_per_store_item / train_batch_size}


class StoreToReplayBuffer(Map):
    """Adds each batch's rows to a ReplayBuffer and passes the batch on; reports the buffer's
    size as `replay_buffer_size`. A MultiAgentBatch's rows go to the buffers of the policies it
    holds (SelectPolicies before this stores only some), reported as policy/<name>/replay_buffer_size
    and their total.

    >>> buf = ReplayBuffer(capacity=8)
    >>> rows = {"obs": np.zeros((2, 1)), "actions": np.zeros(2, np.int64), "rewards": np.ones(2, np.float32),
    ...         "new_obs": np.zeros((2, 1)), "terminateds": np.zeros(2, bool)}
    >>> _ = StoreToReplayBuffer(buf)(SampleBatch(rows)); len(buf)
    2
    """

    def __init__(self, buffer: ReplayBuffer):
        self.buffer = buffer
        self.ctx = None

    def setup(self, ctx) -> None:
        self.ctx = ctx

    def __call__(self, batch: SampleBatch | MultiAgentBatch) -> SampleBatch | MultiAgentBatch:
        self.buffer.add(batch)
        if self.ctx is not None:
            policies = self.buffer.policy_buffers
            for pid, buffer in policies.items():
                self.ctx.info[f"policy/{pid}/replay_buffer_size"] = len(buffer)
            self.ctx.info["replay_buffer_size"] = sum(map(len, policies.values())) if policies else len(self.buffer)
        return batch


class _ReplaySource(Stream):
    """Replay's node. `ready()` tells Concurrently whether pulling now would yield a batch
    (once true it stays true); pulled before that, it waits for rows stored by another thread."""

    def __init__(self, buffer: ReplayBuffer, batch_size: int, learning_starts: int, beta_schedule: list | None,
                 name: str):
        super().__init__(name)
        self.buffer, self.batch_size = buffer, batch_size
        self.min_rows = max(1, learning_starts)
        self.beta_schedule = beta_schedule

    def ready(self) -> bool:
        return self.buffer.holds(self.min_rows)

    def _iterate(self, ctx):
        spent = ctx.operator_time
        spent.setdefault(self.name, 0.0)
        while True:
            while not self.buffer.wait_for(self.min_rows, timeout=0.1):  # a timeout keeps Ctrl-C responsive
                if ctx.closed:
                    return
            t0 = time.perf_counter()
            try:
                counter = "num_agent_steps_sampled" if self.buffer.count_steps_by == "agent_steps" else \
                    "num_env_steps_sampled"
                beta = schedule_value(self.beta_schedule, ctx.counters[counter], DEFAULT_BETA)
                batch = self._sample(beta)
            except Exception as e:
                raise OperatorError(self.name, e) from e
            spent[self.name] += time.perf_counter() - t0
            yield batch

    def _sample(self, beta: float) -> SampleBatch | MultiAgentBatch:
        """A minibatch of the buffer, or multi-agent one of each policy's buffer that holds
        learning_starts rows (a MultiAgentBatch of batch_size env steps: what one step of
        every policy trains)."""
        policies = dict(self.buffer.policy_buffers)   # a copy: the store stream may add a policy meanwhile
        if not policies:
            return self.buffer.sample(self.batch_size, beta)
        batches = {pid: b.sample(self.batch_size, beta) for pid, b in policies.items() if len(b) >= self.min_rows}
        return MultiAgentBatch(batches, self.batch_size, count_steps_by=self.buffer.count_steps_by)


def Replay(buffer: ReplayBuffer, batch_size: int, learning_starts: int = 0, beta_schedule: list | None = None,
           name: str = "Replay") -> Stream[SampleBatch]:
    """An endless stream of `batch_size`-row batches sampled from `buffer` (see
    ReplayBuffer.sample), starting once it holds `learning_starts` rows (at least one). The
    importance-weight exponent beta follows `beta_schedule` ([[timestep, beta], ...],
    piecewise linear in the env steps sampled, or agent steps where the MultiAgentBatches
    stored count those; None: 0.4 throughout). A buffer of MultiAgentBatches yields
    MultiAgentBatches of `batch_size` rows per policy, of each policy whose buffer holds
    `learning_starts` rows. Run it beside the stream that fills the buffer with Concurrently,
    which does not pull it until it is ready: until then the store stream runs alone.

    >>> from flowrl.operators.concurrency import Concurrently
    >>> from flowrl.plan import Plan
    >>> buf = ReplayBuffer(capacity=100, seed=0)
    >>> def batches():
    ...     for i in range(100):
    ...         yield SampleBatch({"obs": np.full((10, 1), i), "actions": np.zeros(10, np.int64),
    ...                            "rewards": np.ones(10, np.float32), "new_obs": np.zeros((10, 1), np.int64),
    ...                            "terminateds": np.zeros(10, bool)})
    >>> store = Stream.source(batches).then(StoreToReplayBuffer(buf))
    >>> train = Replay(buf, batch_size=4, learning_starts=30)
    >>> with Plan(Concurrently({"store": store, "train": train}, output="train")) as plan:
    ...     first = plan.step()
    >>> len(first["output"]), first["replay_buffer_size"]   # three batches stored before the first replay
    (4, 30)
    """
    if batch_size < 1:
        raise ValueError(f"Replay: batch_size must be >= 1, got {batch_size}")
    if learning_starts > buffer.capacity:
        raise ValueError(f"Replay: learning_starts {learning_starts} exceeds the buffer's capacity "
                         f"{buffer.capacity}; replay would never start")
    check_schedule("beta_schedule", beta_schedule)
    return _ReplaySource(buffer, batch_size, learning_starts, beta_schedule, name)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class UpdatePriorities(Map):
    """Takes the learner's per-row `td_error` and the rows' `batch_indexes` out of its stats
    and sets those rows' priorities in `buffer`; passes the other stats on. A uniform buffer
    needs neither (they are removed if present). Multi-agent stats (policy/<name>/td_error, ...)
    set the priorities in each policy's buffer.

    >>> buf = ReplayBuffer(capacity=4, prioritized=True, alpha=1.0, eps=0.5, seed=0)
    >>> rows = {"obs": np.zeros((4, 1)), "actions": np.zeros(4, np.int64), "rewards": np.ones(4, np.float32),
    ...         "new_obs": np.zeros((4, 1)), "terminateds": np.zeros(4, bool)}
    >>> _ = buf.add(SampleBatch(rows))
    >>> UpdatePriorities(buf)({"loss": 0.5, "td_error": np.array([1.5, 0.0]), "batch_indexes": np.array([0, 3])})
    {'loss': 0.5}
    >>> buf.sample(1000)["batch_indexes"].tolist().count(0) > 400   # p = 2, 1, 1, 0.5 of 4.5
    True
    """

    def __init__(self, buffer: ReplayBuffer):
        self.buffer = buffer

    def __call__(self, stats: Mapping[str, Any]) -> dict[str, Any]:
        stats = dict(stats)
        if not self.buffer.policy_buffers:
            self._update(self.buffer, stats, "")
            return stats
        trained = {k.split("/")[1] for k in stats if k.startswith("policy/") and k.count("/") >= 2}
        for pid in sorted(trained & set(self.buffer.policy_buffers)):
            self._update(self.buffer.policy_buffers[pid], stats, f"policy/{pid}/")
        return stats

    @staticmethod
    def _update(buffer: ReplayBuffer, stats: dict[str, Any], prefix: str) -> None:
        indexes, td = stats.pop(f"{prefix}batch_indexes", None), stats.pop(f"{prefix}td_error", None)
        if indexes is None or td is None:
            if buffer.prioritized:
                raise KeyError(f"UpdatePriorities: the learner's stats need per-row '{prefix}td_error' and "
                               f"'{prefix}batch_indexes' arrays (the loss returns them); got {sorted(stats)}")
            return
        buffer.update_priorities(_numpy(indexes), _numpy(td))


# ---- whole batches (IMPALA-style mixin replay) --------------------------------------------------
class BatchReplayBuffer:
    """Keeps the last `capacity` batches whole (for MixInReplay, which replays on-policy
    batches with their trajectories); older ones are dropped.

    >>> buf = BatchReplayBuffer(capacity=2, seed=0)
    >>> for i in range(3):
    ...     buf.add(SampleBatch({"x": np.array([i])}))
    >>> len(buf), sorted(int(buf.sample()["x"][0]) for _ in range(20))[0]
    (2, 1)
    """

    def __init__(self, capacity: int, seed: int | None = 0):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.items: list[SampleBatch] = []
        self.next_index = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, batch: SampleBatch) -> None:
        if len(self.items) < self.capacity:
            self.items.append(batch)
        else:
            self.items[self.next_index] = batch
        self.next_index = (self.next_index + 1) % self.capacity

    def sample(self) -> SampleBatch:
        if not self.items:
            raise ValueError("replay buffer is empty")
        return self.items[int(self.rng.integers(len(self.items)))]


class MixInReplay(FlatMap):
    """Stores each new batch and yields it followed by replayed ones: `replay_proportion`
    replayed batches per new batch on average (0.5: one replayed batch every other new one).

    >>> buf = BatchReplayBuffer(4)
    >>> mix = MixInReplay(buf, replay_proportion=1.0)
    >>> len(mix(SampleBatch({"x": np.arange(2)})))
    2
    """

    def __init__(self, buffer: BatchReplayBuffer, replay_proportion: float):
        if not isinstance(buffer, BatchReplayBuffer):
            raise TypeError(f"MixInReplay replays whole batches: give it a BatchReplayBuffer, "
                            f"not a {type(buffer).__name__}")
        self.buffer = buffer
        self.replay_proportion = replay_proportion
        self.credit = 0.0

    def __call__(self, batch: SampleBatch) -> list[SampleBatch]:
        self.buffer.add(batch)
        self.credit += self.replay_proportion
        out = [batch]
        while self.credit >= 1.0:
            out.append(self.buffer.sample())
            self.credit -= 1.0
        return out
