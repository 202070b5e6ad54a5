"""A small demo: build a SampleBatch, split it by episode, ship it through Ray and back."""

import numpy as np
import ray

from flowrl import SampleBatch

batch = SampleBatch({
    "obs": np.random.default_rng(0).standard_normal((8, 4), dtype=np.float32),
    "actions": np.array([0, 1, 1, 0, 1, 0, 0, 1]),
    "rewards": np.ones(8, dtype=np.float32),
    "eps_id": np.array([0, 0, 0, 1, 1, 2, 2, 2]),
})
print(batch)
print("episode lengths:", [len(e) for e in batch.split_by_episode()])
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
assert ray.get(ray.put(batch)) == batch
print("Ray round trip: equal")
ray.shutdown()
