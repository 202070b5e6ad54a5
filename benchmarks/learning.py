"""Learning results of the built-in plans, several seeds each; every seed must reach its target.

    python benchmarks/learning.py [--seeds 0,1,2] [--only ppo_cartpole,a2c_cartpole]

Each row runs `flowrl run examples/<name>.yaml --seed S` (in-process) and reports the env
steps at which `episode_return_mean` (last 100 training episodes) reached the target, or
"missed" when the budget ran out first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowrl.experiment import load_experiments, run_experiment  # noqa: E402

# example file, executor, the target and budget
RESULTS = {
    "ppo_cartpole": ("local", 475, 100_000),
    "ppo_cartpole_defaults": ("local", 475, 200_000),
    "a2c_cartpole": ("local", 475, 500_000),
    "appo_cartpole": ("ray", 475, 300_000),
    "ppo_pendulum": ("local", -200, 300_000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=",".join(RESULTS))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name in args.only.split(","):
            executor, target, budget = RESULTS[name]
            for seed in seeds:
                (exp,) = load_experiments(ROOT / "examples" / f"{name}.yaml", seed=seed)
                t0 = time.perf_counter()
                result = run_experiment(exp, Path(out), executor, quiet=True, stream=open("/dev/null", "w"))
                wall = time.perf_counter() - t0
                ret = result.get("episode_return_mean")
                reached = ret is not None and ret >= target and result["timesteps_total"] <= budget
                rows.append((name, seed, target, budget, result["timesteps_total"], ret, reached, wall))
                print(f"{name:24s} seed {seed}  target {target:>5} within {budget:>7,}  "
                      f"{'reached at' if reached else 'MISSED, at':>10} {result['timesteps_total']:>8,} steps  "
                      f"return {ret if ret is None else round(ret, 1)}  {wall:6.1f} s", flush=True)
    print()
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        ok = sum(r[6] for r in mine)
        steps = [r[4] for r in mine if r[6]]
        median = f"median {statistics.median(steps):,.0f} steps" if steps else ""
        print(f"{name:24s} {ok}/{len(mine)} seeds reached {mine[0][2]} within {mine[0][3]:,} env steps  {median}")


if __name__ == "__main__":
    main()
