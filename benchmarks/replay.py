"""Replay buffer speed and memory, from one run.

    python benchmarks/replay.py [--image-capacity 4000]

add() of 200-row fragments (4 sub-envs x 50 steps, 37-step episodes, so n-step rows wait
across fragments), sample(256) and update_priorities(256), for CartPole rows (4 float32) in a
full 100k-row buffer and for 84x84x4 uint8 rows in a smaller one (100k of those would take
5.65 GB; estimate_nbytes prints that without allocating it). Each figure is the best of 15
rounds: on a shared machine the minimum is the least disturbed one. Goal: sample(256) of
CartPole rows under 100 us.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

from flowrl.operators.replay import ReplayBuffer, format_nbytes
from flowrl.sample_batch import SampleBatch


def fragments(obs_shape, obs_dtype, envs=4, T=50, ep_len=37, count=40) -> list[SampleBatch]:
    rng = np.random.default_rng(0)
    total = T * count
    per_env = []
    for e in range(envs):
        step = np.arange(total)
        t = step % ep_len
        obs = (rng.random((total, *obs_shape)) * 255).astype(obs_dtype)
        per_env.append({"obs": obs, "new_obs": obs, "actions": rng.integers(0, 2, total),
                        "rewards": np.ones(total, np.float32), "terminateds": t == ep_len - 1,
                        "truncateds": np.zeros(total, bool), "eps_id": (e + envs * (step // ep_len)).astype(np.int64),
                        "t": t.astype(np.int64)})
    return [SampleBatch({c: np.concatenate([p[c][k * T:(k + 1) * T] for p in per_env]) for c in per_env[0]})
            for k in range(count)]


def best(fn, reps: int, rounds: int = 15) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-capacity", type=int, default=4000)
    args = parser.parse_args()
    for name, shape, dtype, capacity in [("CartPole (4,) float32", (4,), np.float32, 100_000),
                                         ("84x84x4 uint8", (84, 84, 4), np.uint8, args.image_capacity)]:
        frags = fragments(shape, dtype)
        image = dtype == np.uint8
        for n_step in (1, 3):
            for prioritized in (False, True):
                buf = ReplayBuffer(capacity, n_step=n_step, prioritized=prioritized, seed=0)
                added = [0]

                def add():
                    buf.add(frags[added[0] % len(frags)])
                    added[0] += 1

                while len(buf) < capacity:
                    add()
                t_add = best(add, 10 if image else 40)
                t_sample = best(lambda: buf.sample(256), 50 if image else 300)
                line = (f"{name:22s} n_step={n_step} {'PER    ' if prioritized else 'uniform'}: "
                        f"add(200 rows) {t_add * 1e3:6.3f} ms ({200 / t_add:>10,.0f} rows/s); "
                        f"sample(256) {t_sample * 1e6:6.0f} us")
                if prioritized:
                    slots = buf.sample(256)["batch_indexes"]
                    td = np.random.default_rng(1).random(256)
                    t_update = best(lambda: buf.update_priorities(slots, td), 300)
                    line += f"; update_priorities(256) {t_update * 1e6:.0f} us"
                print(line, flush=True)
    image = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    for label, spaces in [("84x84x4 uint8", {"obs": image, "actions": gym.spaces.Discrete(4)}),
                          ("CartPole", {"obs": gym.spaces.Box(-1, 1, (4,)), "actions": gym.spaces.Discrete(2)})]:
        nbytes = ReplayBuffer.estimate_nbytes(100_000, spaces)
        print(f"estimate_nbytes(100,000 rows, {label}) = {format_nbytes(nbytes)} ({nbytes:,} B: obs and new_obs "
              f"columns); prioritized {format_nbytes(ReplayBuffer.estimate_nbytes(100_000, spaces, True))}")


if __name__ == "__main__":
    main()
