"""Array-based segment trees over numpy (a sum tree and a min tree), for prioritized replay.

The tree lives in one array of 2 * P nodes, P the capacity rounded up to a power of two:
node 1 is the root, node i has children 2i and 2i + 1, leaf j is node P + j. Every operation
takes a whole batch of indexes and works level by level (about log2(P) numpy calls), never
item by item in Python. A parent is always recomputed from its two children, never adjusted
by a difference, so the tree after any sequence of updates is bit for bit the tree built
from scratch over the same leaves: sums do not drift.

>>> tree = SumTree(5)
>>> tree.update(np.array([0, 1, 4]), np.array([1.0, 2.0, 5.0]))
>>> tree.total(), tree.find_prefix_sum(np.array([0.0, 1.0, 2.5, 7.9])).tolist()
(8.0, [0, 1, 1, 4])
>>> mins = MinTree(5); mins.update(np.array([2, 3]), np.array([0.5, 0.25])); mins.min()
0.25
"""

from __future__ import annotations

import numpy as np


class SegmentTree:
    """A complete binary tree of `operation` (a numpy ufunc such as np.add or np.minimum)
    over `capacity` leaves; leaves never written hold `neutral` (0 for sums, +inf for mins)."""

    def __init__(self, capacity: int, operation: np.ufunc, neutral: float):
        if capacity < 1:
            raise ValueError(f"segment tree capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.depth = max(int(capacity - 1).bit_length(), 0)   # levels below the root
        self.leaf_offset = 1 << self.depth                    # P: node index of leaf 0
        self.operation, self.neutral = operation, neutral
        self.tree = np.full(2 * self.leaf_offset, neutral, dtype=np.float64)

    @property
    def values(self) -> np.ndarray:
        """The leaves (read-only view)."""
        view = self.tree[self.leaf_offset:self.leaf_offset + self.capacity]
        view.flags.writeable = False
        return view

    def __getitem__(self, indexes) -> np.ndarray:
        return self.tree.take(self.leaf_offset + np.asarray(indexes))

    def update(self, indexes: np.ndarray, values: np.ndarray) -> None:
        """Set leaves `indexes` to `values` and recompute their ancestors. Where an index is
        repeated, the value written last (the later position in `indexes`) wins."""
        update_together([self], indexes, values)

    def reduce(self) -> float:
        """`operation` over all leaves (the root)."""
        return float(self.tree[1])

    def rebuild(self, values: np.ndarray) -> None:
        """Replace all leaves at once (from a checkpoint) and recompute every level."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(values) > self.capacity:
            raise ValueError(f"{len(values)} values for a segment tree of capacity {self.capacity}")
        P = self.leaf_offset
        self.tree[:] = self.neutral
        self.tree[P:P + len(values)] = values
        start = P
        while start > 1:
            half = start >> 1
            self.tree[half:start] = self.operation(self.tree[start:2 * start:2], self.tree[start + 1:2 * start:2])
            start = half


class SumTree(SegmentTree):
    """Sums of non-negative priorities, and sampling proportional to them."""

    def __init__(self, capacity: int):
        super().__init__(capacity, np.add, 0.0)

    def update(self, indexes: np.ndarray, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0):
            raise ValueError("sum tree values must be finite and >= 0")
        super().update(indexes, values)

    def total(self) -> float:
        return self.reduce()

    def find_prefix_sum(self, prefix_sums: np.ndarray) -> np.ndarray:
        """For each `u` in `prefix_sums` (0 <= u < total), the leaf i with
        sum(leaves[:i]) <= u < sum(leaves[:i + 1]): drawing u uniformly in [0, total) picks
        leaf i with probability leaves[i] / total. One pass down the levels for all of them."""
        u = np.array(prefix_sums, dtype=np.float64, copy=True).reshape(-1)
        nodes = np.ones(len(u), dtype=np.int64)
        tree = self.tree
        for _ in range(self.depth):
            nodes <<= 1                       # the left child
            left = tree.take(nodes)
            right = u >= left                 # [0, left) belongs to the left subtree
            u -= left * right
            nodes += right
        # Rounding in `u - left` can, at worst, step past the last non-zero leaf: clamp.
        return np.minimum(nodes - self.leaf_offset, self.capacity - 1)


class MinTree(SegmentTree):
    """Minimum of the leaves (unwritten leaves count as +inf)."""

    def __init__(self, capacity: int):
        super().__init__(capacity, np.minimum, np.inf)

    def min(self) -> float:
        return self.reduce()


def update_together(trees: list[SegmentTree], indexes: np.ndarray, values: np.ndarray) -> None:
    """Set the same leaves of several trees of one capacity (a sum and a min tree over the
    same priorities) to `values`, walking the levels once for all of them. Where an index is
    repeated, the value written last (the later position in `indexes`) wins."""
    first_tree = trees[0]
    if any(t.capacity != first_tree.capacity for t in trees):
        raise ValueError("update_together needs trees of one capacity")
    indexes = np.asarray(indexes, dtype=np.int64).reshape(-1)
    values = np.broadcast_to(np.asarray(values, dtype=np.float64), indexes.shape)
    if not len(indexes):
        return
    if indexes.min() < 0 or indexes.max() >= first_tree.capacity:
        raise IndexError(f"segment tree index out of range [0, {first_tree.capacity})")
    # The last write wins: keep each index's last occurrence (np.unique on the reversed array
    # gives first occurrences there).
    unique, first_from_end = np.unique(indexes[::-1], return_index=True)
    nodes = unique + first_tree.leaf_offset
    values = values[::-1][first_from_end]
    for t in trees:
        t.tree[nodes] = values
    for _ in range(first_tree.depth):
        # Siblings share a parent, which is then computed twice from the same children: the
        # same value, and cheaper than removing the repeats at every level.
        nodes >>= 1
        left = nodes << 1
        right = left + 1
        for t in trees:
            t.tree[nodes] = t.operation(t.tree.take(left), t.tree.take(right))
