"""What benchmarks/mujoco.py and benchmarks/atari.py share: running flowrl or a peer's script in a
fresh process, timed from process start, with the peak memory of its whole process tree."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOWRL = [sys.executable, "-m", "flowrl.cli"]


@dataclass
class Measured:
    wall_s: float        # from process start to exit: imports, start-up, sampling and learning
    peak_rss_mb: float   # the largest sum of RSS over the process and its children (Ray's workers too)
    steps: int           # env steps it took
    episode_return: float  # mean return of the last 100 training episodes, unclipped

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_s


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB of the process tree, stdout); raises with stderr's tail if it fails."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def poll() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak = max(peak, total)
            except psutil.Error:
                pass  # a child that exited between listing and reading
            done.wait(0.5)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} failed:\n{stderr[-2000:]}")
    return wall, peak / 2**20, stdout


def flowrl_run(example: str, steps: int, seed: int, *extra: str) -> Measured:
    """`flowrl run EXAMPLE --set stop.timesteps_total=STEPS --seed SEED EXTRA...`, measured."""
    with tempfile.TemporaryDirectory() as out:
        wall, rss, stdout = run_measured([*FLOWRL, "run", example, "--set", f"stop.timesteps_total={steps}",
                                          "--seed", str(seed), "--quiet", "--output-dir", out, *extra])
        run_dir = re.search(r"run dir (\S+)", stdout).group(1)
        last = json.loads((Path(run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    return Measured(wall, rss, int(last["timesteps_total"]), float(last.get("episode_return_mean", float("nan"))))


def peer_run(script: str, *args: object) -> Measured:
    """A peer's script (python -c) that prints `RESULT <steps> <mean return of the last 100 episodes>`."""
    wall, rss, stdout = run_measured([sys.executable, "-c", script, *map(str, args)])
    _, steps, ret = next(line for line in stdout.splitlines() if line.startswith("RESULT ")).split()
    return Measured(wall, rss, int(steps), float(ret))


def row(name: str, m: Measured) -> str:
    return (f"  {name:<28} {m.steps:>9,} steps  {m.wall_s:8.1f} s  {m.steps_per_s:8.0f} steps/s  "
            f"return {m.episode_return:9.1f}  peak RSS {m.peak_rss_mb:7.0f} MB")
