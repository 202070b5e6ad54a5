"""Learning results of the built-in plans, several seeds each; every seed must reach its target.

    python benchmarks/learning.py [--seeds 0,1,2] [--only ppo_cartpole,a2c_cartpole] [--budgets ci]

Each row runs `flowrl run examples/<name>.yaml --seed S` (in-process) and reports the env
steps at which `episode_return_mean` (last 100 training episodes, or the example's
`metrics_num_episodes_for_smoothing`) reached the target, or "missed" when the budget ran out
first. DQN rows read `evaluation/episode_return_mean` (10 greedy episodes) instead. `--budgets ci` checks the smaller budgets and bounds
of tests/test_learning.py instead (every seed should clear them, not only the test's seed 0).
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

from flowrl.experiment import load_experiments, result_value, run_experiment  # noqa: E402

# example file, executor, the target and budget (and the result key it is read from,
# when that is not episode_return_mean)
GREEDY = "evaluation/episode_return_mean"  # greedy 10-episode evaluation
RESULTS = {
    "ppo_cartpole": ("local", 475, 100_000),
    "ppo_cartpole_defaults": ("local", 475, 200_000),
    "a2c_cartpole": ("local", 475, 500_000),
    "appo_cartpole": ("ray", 475, 300_000),
    "ppo_pendulum": ("local", -200, 300_000),
    "dqn_cartpole": ("local", 475, 100_000, GREEDY),
    "dqn_cartpole_defaults": ("local", 475, 200_000, GREEDY),
    "sac_pendulum": ("local", -200, 20_000),
    "sac_pendulum_defaults": ("local", -200, 30_000),
}
# tests/test_learning.py: the return each run must reach within a CI budget (local executor)
CI_RESULTS = {
    "ppo_cartpole": ("local", 475, 100_000),
    "a2c_cartpole": ("local", 350, 150_000),
    "appo_cartpole": ("local", 300, 60_000),
    "ppo_pendulum": ("local", -400, 100_000),
    # tests/test_dqn.py and tests/test_sac.py
    "dqn_cartpole": ("local", 475, 30_000, GREEDY),
    "sac_pendulum": ("local", -400, 8_000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="comma-separated example names (default: all)")
    parser.add_argument("--budgets", choices=["full", "ci"], default="full")
    args = parser.parse_args()
    table = CI_RESULTS if args.budgets == "ci" else RESULTS
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name in (args.only or ",".join(table)).split(","):
            executor, target, budget, *key = table[name]
            key = key[0] if key else "episode_return_mean"
            for seed in seeds:
                (exp,) = load_experiments(ROOT / "examples" / f"{name}.yaml", [("stop.timesteps_total", budget)],
                                          seed=seed)
                t0 = time.perf_counter()
                result = run_experiment(exp, Path(out), executor, quiet=True, stream=open("/dev/null", "w"))
                wall = time.perf_counter() - t0
                ret = result_value(result, key)
                # ci: the return when the budget ran out (its last iteration may end a little past it)
                in_budget = args.budgets == "ci" or result["timesteps_total"] <= budget
                reached = ret is not None and ret >= target and in_budget
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
