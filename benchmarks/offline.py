"""Offline input speed and memory: stream a 1M-row CartPole dataset into shuffled minibatches.

Prints, from one run:
  * rows/s of flowrl's input connector (Dataset.batches: random row-group order, a shuffle
    buffer, SampleBatches of 512 rows) vs a plain `pyarrow.dataset` scan of the same files and
    columns (ratio; goal >= 0.8);
  * peak memory growth (RSS) while streaming vs the shuffle buffer plus one row group
    (ratio; goal <= 2).

The dataset is recorded once by a CartPole rollout worker through the output connector and
kept in a temporary directory for the run. Each measurement runs in its own fresh process
(memory high-water marks are per process), interleaved and repeated; the best is kept.

    python benchmarks/offline.py [--rows 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BATCH = 512
BUFFER = 100_000


def record(path: str, rows: int) -> None:
    from flowrl.connectors import DatasetWriter
    from flowrl.rollout import RolloutWorker

    worker = RolloutWorker("CartPole-v1", num_envs_per_worker=16, rollout_fragment_length=256, seed=0)
    written = 0
    with DatasetWriter(path) as writer:
        while written < rows:
            batch = worker.sample()
            batch = batch[:min(len(batch), rows - written)]
            writer.write(batch)
            written += len(batch)
    worker.close()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def measure(kind: str, path: str) -> dict:
    """Runs in a child process: one full pass, its rows/s and its memory high-water mark."""
    import pyarrow.dataset as pads

    from flowrl.connectors import OUTPUT_COLUMNS, Dataset
    from flowrl.sample_batch import SampleBatch

    columns = list(OUTPUT_COLUMNS)
    data = Dataset.open(path)
    os.sched_yield()
    base = rss_bytes()
    # Reset the high-water mark so that it measures only the pass (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rows = 0
    t0 = time.perf_counter()
    if kind == "flowrl":
        for batch in data.batches(columns, BATCH, shuffle_buffer_size=BUFFER, seed=0, num_epochs=1):
            rows += len(batch)
    else:
        for rb in pads.dataset(path, format="parquet").to_batches(columns=columns):
            rows += rb.num_rows
    elapsed = time.perf_counter() - t0
    first = SampleBatch.from_arrow(data.read(data.chunks[0], columns))
    row_bytes = first.nbytes / len(first)
    row_group_rows = max(c.num_rows for c in data.chunks)
    return {"rows": rows, "seconds": elapsed, "growth": peak_bytes() - base, "row_bytes": row_bytes,
            "row_group_rows": row_group_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    with tempfile.TemporaryDirectory() as path:
        t0 = time.perf_counter()
        record(path, args.rows)
        print(f"recorded {args.rows:,} CartPole rows in {time.perf_counter() - t0:.1f} s "
              f"({len(os.listdir(path))} Parquet files)")
        best: dict[str, dict] = {}
        for i in range(args.repeats):
            for kind in (["flowrl", "pyarrow"] if i % 2 == 0 else ["pyarrow", "flowrl"]):
                out = subprocess.run([sys.executable, __file__, "--child", kind, path], check=True,
                                     capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                assert r["rows"] == args.rows, r
                if kind not in best or r["seconds"] < best[kind]["seconds"]:
                    best[kind] = {**r, "growth": min(r["growth"], best.get(kind, r)["growth"])}
        f, p = best["flowrl"], best["pyarrow"]
        f_rate, p_rate = f["rows"] / f["seconds"], p["rows"] / p["seconds"]
        print(f"rows/s, all columns: flowrl (shuffled minibatches of {BATCH}) {f_rate:,.0f} vs "
              f"pyarrow.dataset scan {p_rate:,.0f}: ratio {f_rate / p_rate:.2f} (goal >= 0.8)")
        bound = (BUFFER + f["row_group_rows"]) * f["row_bytes"]
        print(f"peak memory growth while streaming: {f['growth'] / 2**20:.1f} MiB vs shuffle buffer "
              f"({BUFFER:,} rows) + one row group ({f['row_group_rows']:,} rows) = {bound / 2**20:.1f} MiB: "
              f"ratio {f['growth'] / bound:.2f} (goal <= 2); the plain scan grew {p['growth'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
