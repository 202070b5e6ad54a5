"""SampleBatch transport costs vs the same data as a dict of numpy arrays, in one run.

    python benchmarks/batch_transport.py [--mb 100] [--repeats 41]

Prints ray.put+get and an actor round trip (SampleBatch / dict-of-numpy time ratio, minimum
of interleaved repeats since the object store stalls now and then), IPC write/read in GB/s,
and the time to concat 64 batches. Goal: ratios <= 1.0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray

from flowrl import SampleBatch


def make_columns(total_mb: int) -> dict[str, np.ndarray]:
    rows = total_mb * 1024 * 1024 // (84 * 4 * 2 + 8 * 4)  # two 84-float obs columns dominate
    rng = np.random.default_rng(0)
    return {
        "obs": rng.standard_normal((rows, 84), dtype=np.float32),
        "new_obs": rng.standard_normal((rows, 84), dtype=np.float32),
        "actions": rng.integers(0, 4, rows),
        "rewards": rng.standard_normal(rows, dtype=np.float32),
        "terminateds": rng.random(rows) < 0.01,
        "truncateds": np.zeros(rows, dtype=bool),
        "eps_id": np.repeat(np.arange(rows // 100 + 1), 100)[:rows],
        "action_logp": rng.standard_normal(rows, dtype=np.float32),
    }


@ray.remote
class Echo:
    def echo(self, x):
        return x


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=41)
    args = parser.parse_args()

    columns = make_columns(args.mb)
    batch = SampleBatch(columns)
    size_gb = batch.nbytes / 1e9
    print(f"batch: {len(batch)} rows, {batch.nbytes / 1e6:.1f} MB")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    echo = Echo.remote()
    ray.get(echo.echo.remote(1))

    def put_get(x):
        return lambda: ray.get(ray.put(x))

    def round_trip(x):
        return lambda: ray.get(echo.echo.remote(x))

    assert ray.get(ray.put(batch)) == batch
    rows = []
    for label, make in (("ray.put + ray.get", put_get), ("actor round trip", round_trip)):
        times = {"sb": [], "np": []}
        for i in range(args.repeats):
            # Interleave, alternating which goes first, so that a stall of the object store (or
            # the freeing of the previous object) hits both sides alike.
            for key in (("sb", "np") if i % 2 else ("np", "sb")):
                # The object store frees the last 100 MB object asynchronously; a put made while
                # it does so takes ~3x longer, whichever side makes it. Let it settle first.
                time.sleep(0.05)
                times[key].append(best_of(make(batch if key == "sb" else columns), 1))
        sb, npy = min(times["sb"]), min(times["np"])
        median_ratio = statistics.median(times["sb"]) / statistics.median(times["np"])
        rows.append((label, sb, npy))
        print(f"{label:20s} SampleBatch {sb * 1e3:8.1f} ms   dict of numpy {npy * 1e3:8.1f} ms   "
              f"ratio {sb / npy:.2f} (goal <= 1.0; ratio of medians {median_ratio:.2f})")

    write = best_of(batch.to_ipc, args.repeats)
    buf = batch.to_ipc()
    read = best_of(lambda: SampleBatch.from_ipc(buf)["obs"], args.repeats)
    print(f"IPC write {size_gb / write:8.2f} GB/s   IPC read {size_gb / read:8.2f} GB/s (zero-copy)")

    pieces = [batch[i * (len(batch) // 64):(i + 1) * (len(batch) // 64)] for i in range(64)]
    concat = best_of(lambda: SampleBatch.concat(pieces), args.repeats)
    np_concat = best_of(lambda: {k: np.concatenate([p[k] for p in pieces]) for k in columns}, args.repeats)
    print(f"concat of 64 batches {concat * 1e3:8.1f} ms ({size_gb / concat:.2f} GB/s); "
          f"numpy per-column concatenate {np_concat * 1e3:.1f} ms, ratio {concat / np_concat:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
