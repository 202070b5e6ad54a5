"""Running mean and variance of observations and returns, merged across rollout workers.

The `normalize` env preset (flowrl.env_pipeline) scales observations to zero mean and unit
variance and rewards by the standard deviation of the discounted return, as gymnasium's
NormalizeObservation / NormalizeReward and Stable-Baselines3's VecNormalize do (clip 10,
epsilon 1e-8). One set of statistics serves every worker:

- each worker normalizes with `current` = the shared statistics it was last sent, merged with
  what it has seen since (`delta`);
- it sends its `delta` with each batch it samples (SampleBatch.normalize_delta) and starts a
  new one;
- the driver merges the deltas into its own statistics (the master copy, saved in checkpoints)
  and sends them to the workers with the weights.

Statistics merge exactly (Chan, Golub and LeVeque 1979): merging A's and B's gives the mean and
variance of A's and B's data pooled.

>>> a, b = RunningMeanStd(()), RunningMeanStd(())
>>> a.update(np.array([1.0, 3.0])); b.update(np.array([5.0]))
>>> a.merge(b); a.count, float(a.mean), float(a.var)  # [1, 3, 5]: mean 3, variance 8 / 3
(3.0, 3.0, 2.6666666666666665)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def moments(rows: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Count, mean and M2 of a batch of rows (shape (n, *shape))."""
    rows = np.asarray(rows, np.float64)
    if not len(rows):
        return 0.0, 0.0, 0.0
    mean = rows.mean(axis=0)
    return float(len(rows)), mean, ((rows - mean) ** 2).sum(axis=0)


class RunningMeanStd:
    """Count, mean and M2 (the sum of squared deviations from the mean) of the rows seen."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.count = 0.0
        self.mean = np.zeros(self.shape, np.float64)
        self.m2 = np.zeros(self.shape, np.float64)

    @property
    def var(self) -> np.ndarray:
        """The population variance; 1 before any data (so that nothing is scaled yet)."""
        return self.m2 / self.count if self.count > 0 else np.ones(self.shape, np.float64)

    def update(self, rows: np.ndarray) -> None:
        """Add a batch of rows (shape (n, *shape))."""
        self.merge_moments(*moments(rows))

    def merge(self, other: "RunningMeanStd") -> None:
        self.merge_moments(other.count, other.mean, other.m2)

    def merge_moments(self, count: float, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan et al.'s parallel update: the moments of this data and another set pooled."""
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    def copy(self) -> "RunningMeanStd":
        other = RunningMeanStd(self.shape)
        other.count, other.mean, other.m2 = self.count, self.mean.copy(), self.m2.copy()
        return other

    def to_list(self) -> list:
        """[count, mean, m2] as plain numbers (msgpack / JSON), exact in float64."""
        return [self.count, self.mean.reshape(-1).tolist(), self.m2.reshape(-1).tolist()]

    def merge_list(self, moments: list) -> None:
        count, mean, m2 = moments
        self.merge_moments(float(count), np.asarray(mean, np.float64).reshape(self.shape),
                           np.asarray(m2, np.float64).reshape(self.shape))


class Normalizer:
    """The statistics of one worker (or of the driver, the master copy) for observations of
    `obs_shape` and for the discounted return with `gamma`; see the module docstring."""

    def __init__(self, obs_shape: tuple[int, ...], gamma: float = 0.99, clip: float = 10.0, epsilon: float = 1e-8):
        self.obs_shape, self.gamma, self.clip, self.epsilon = tuple(obs_shape), gamma, clip, epsilon
        self.shared = {"obs": RunningMeanStd(self.obs_shape), "ret": RunningMeanStd(())}
        # The rows seen since the last delta was sent: their moments are taken once, when it is.
        self.seen: dict[str, list[np.ndarray]] = {"obs": [], "ret": []}
        self.current = {k: s.copy() for k, s in self.shared.items()}

    # ---- applying them ----------------------------------------------------------------------
    def observations(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        """(obs - mean) / sqrt(var + eps), clipped to +-clip, float32; `update` first adds the
        rows to the statistics (training), else they stay frozen (evaluation)."""
        if update:
            self._add("obs", obs)
        stats = self.current["obs"]
        scaled = (np.asarray(obs, np.float64) - stats.mean) / np.sqrt(stats.var + self.epsilon)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)

    def rewards(self, rewards: np.ndarray, returns: np.ndarray, counted: np.ndarray) -> np.ndarray:
        """Rewards divided by the standard deviation of the discounted return, clipped to +-clip.
        `returns` are the discounted returns so far of each sub-env including this reward; only
        those marked `counted` are added to the statistics (not a vector env's autoreset rows)."""
        self._add("ret", returns[counted])
        scaled = np.asarray(rewards, np.float64) / np.sqrt(self.current["ret"].var + self.epsilon)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)

    def _add(self, key: str, rows: np.ndarray) -> None:
        rows = np.array(rows, np.float64)  # a copy: the env may reuse its buffer
        self.seen[key].append(rows)
        self.current[key].merge_moments(*moments(rows))

    # ---- moving them between workers ----------------------------------------------------------
    def pop_delta(self) -> dict[str, list]:
        """What this copy has seen since the last call, as plain numbers, and a fresh delta."""
        out = {k: self._seen_stats(k).to_list() for k in self.seen}
        self.seen = {k: [] for k in self.seen}
        return out

    def _seen_stats(self, key: str) -> RunningMeanStd:
        stats = RunningMeanStd(self.shared[key].shape)
        if self.seen[key]:
            stats.update(np.concatenate(self.seen[key]))
        return stats

    def merge_delta(self, delta: dict[str, list]) -> None:
        """Add a worker's delta to the shared statistics (the driver's master copy)."""
        for key, moments in delta.items():
            self.shared[key].merge_list(moments)
        self._recompute()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shared statistics as float64 tensors (checkpoints, the weight broadcast)."""
        return {f"{key}.{part}": torch.tensor(value, dtype=torch.float64)
                for key, stats in self.shared.items()
                for part, value in (("count", stats.count), ("mean", stats.mean), ("m2", stats.m2))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take shared statistics sent by the driver or read from a checkpoint; what this copy has
        seen since its last delta stays in `current`."""
        for key, stats in self.shared.items():
            try:
                mean = np.asarray(state[f"{key}.mean"], np.float64)
                m2 = np.asarray(state[f"{key}.m2"], np.float64)
                count = float(state[f"{key}.count"])
            except KeyError as e:
                raise ValueError(f"normalize statistics: missing {e.args[0]!r}") from None
            if mean.shape != stats.shape or m2.shape != stats.shape:
                raise ValueError(f"normalize statistics: {key} has shape {mean.shape}, observations have "
                                 f"{stats.shape}")
            stats.count, stats.mean, stats.m2 = count, mean, m2
        self._recompute()

    def _recompute(self) -> None:
        self.current = {k: s.copy() for k, s in self.shared.items()}
        for key in self.seen:
            self.current[key].merge(self._seen_stats(key))


def merge_deltas(deltas: list[dict[str, list] | None]) -> dict[str, list] | None:
    """One delta for the rows of several batches (SampleBatch.concat)."""
    deltas = [d for d in deltas if d]
    if len(deltas) <= 1:
        return deltas[0] if deltas else None
    merged = {}
    for key in deltas[0]:
        total = RunningMeanStd(np.shape(deltas[0][key][1]))
        for delta in deltas:
            total.merge_list(delta[key])
        merged[key] = total.to_list()
    return merged
