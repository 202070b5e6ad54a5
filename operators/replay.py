"""A bounded ring buffer of SampleBatches and the operators around it: StoreToReplayBuffer,
Replay, MixInReplay."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from flowrl.sample_batch import SampleBatch
from flowrl.stream import FlatMap, Map, Stream


class ReplayBuffer:
    """Keeps the last `capacity` batches; older ones are dropped.

    >>> buf = ReplayBuffer(capacity=2, seed=0)
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


class StoreToReplayBuffer(Map):
    """Adds each batch to a ReplayBuffer and passes it on.

    >>> buf = ReplayBuffer(4)
    >>> _ = StoreToReplayBuffer(buf)(SampleBatch({"x": np.arange(2)})); len(buf)
    1
    """

    def __init__(self, buffer: ReplayBuffer):
        self.buffer = buffer

    def __call__(self, batch: SampleBatch) -> SampleBatch:
        self.buffer.add(batch)
        return batch


def Replay(buffer: ReplayBuffer, name: str = "Replay") -> Stream[SampleBatch]:
    """An endless stream of batches drawn at random from `buffer` (it must not be empty when
    the stream is read; use it after a StoreToReplayBuffer in the same plan).

    >>> buf = ReplayBuffer(4); buf.add(SampleBatch({"x": np.arange(2)}))
    >>> from flowrl.stream import take
    >>> [len(b) for b in take(Replay(buf), 2)]
    [2, 2]
    """

    def draws() -> Iterator[SampleBatch]:
        while True:
            yield buffer.sample()

    return Stream.source(draws, name=name)


class MixInReplay(FlatMap):
    """Stores each new batch and yields it followed by replayed ones: `replay_proportion`
    replayed batches per new batch on average (0.5: one replayed batch every other new one).

    >>> buf = ReplayBuffer(4)
    >>> mix = MixInReplay(buf, replay_proportion=1.0)
    >>> len(mix(SampleBatch({"x": np.arange(2)})))
    2
    """

    def __init__(self, buffer: ReplayBuffer, replay_proportion: float):
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
