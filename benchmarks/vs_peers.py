"""flowrl vs Stable-Baselines3 (and RLlib when `ray[rllib]` is installed) on the same machine, in
one run: wall time from process start until the mean return of the last 100 training episodes
reaches 475 on CartPole-v1, median of 3 seeds.

    python benchmarks/vs_peers.py [--seeds 0,1,2]

flowrl: `flowrl run examples/ppo_cartpole.yaml --seed S` (stops at 475 or 100k steps).
SB3: PPO with RL-Zoo's CartPole hyperparameters (n_envs 8, n_steps 32, batch 256, 20 epochs,
gae_lambda 0.8, gamma 0.98, learning rate and clip range linearly decayed from 1e-3 and 0.2 over
100k steps), stopped by a callback at the same criterion (SB3's 100-episode info buffer).
Each is a fresh process; the time includes interpreter start and imports. Goal: flowrl <= 0.5x SB3.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SB3_SCRIPT = r"""
import sys
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

seed = int(sys.argv[1])

class StopAt475(BaseCallback):
    def _on_step(self):
        buf = self.model.ep_info_buffer
        return not (len(buf) == buf.maxlen and np.mean([e["r"] for e in buf]) >= 475)

def linear(start):
    return lambda progress_remaining: progress_remaining * start

env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, n_epochs=20, gae_lambda=0.8, gamma=0.98,
            ent_coef=0.0, learning_rate=linear(1e-3), clip_range=linear(0.2), seed=seed, device="cpu", verbose=0)
model.learn(total_timesteps=100_000, callback=StopAt475())
buf = model.ep_info_buffer
print("RESULT", model.num_timesteps, np.mean([e["r"] for e in buf]))
"""

RLLIB_SCRIPT = r"""
import sys
from ray.rllib.algorithms.ppo import PPOConfig
seed = int(sys.argv[1])
config = (PPOConfig().environment("CartPole-v1").env_runners(num_env_runners=0, num_envs_per_env_runner=8)
          .training(lr=1e-3).debugging(seed=seed))
algo = config.build()
while True:
    r = algo.train()
    ret = r["env_runners"].get("episode_return_mean", 0)
    steps = r["num_env_steps_sampled_lifetime"]
    if ret >= 475 or steps >= 200_000:
        print("RESULT", steps, ret)
        break
"""


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    flowrl_bin = str(Path(sys.executable).with_name("flowrl"))
    times: dict[str, list[float]] = {"flowrl": [], "sb3": [], "rllib": []}
    # ray ships ray.rllib, but it imports only with ray[rllib]'s extra dependencies.
    have_rllib = subprocess.run([sys.executable, "-c", "import ray.rllib.algorithms.ppo"],
                                capture_output=True).returncode == 0
    with tempfile.TemporaryDirectory() as out:
        for seed in seeds:  # interleaved, so that machine noise hits each alike
            wall, stdout = timed([flowrl_bin, "run", "examples/ppo_cartpole.yaml", "--seed", str(seed), "--quiet",
                                  "--output-dir", out], ROOT)
            times["flowrl"].append(wall)
            print(f"seed {seed}  flowrl {wall:6.1f} s   {stdout.strip().splitlines()[-1]}", flush=True)
            wall, stdout = timed([sys.executable, "-c", SB3_SCRIPT, str(seed)], ROOT)
            times["sb3"].append(wall)
            print(f"seed {seed}  SB3    {wall:6.1f} s   {stdout.strip().splitlines()[-1]}", flush=True)
            if have_rllib:
                wall, stdout = timed([sys.executable, "-c", RLLIB_SCRIPT, str(seed)], ROOT)
                times["rllib"].append(wall)
                print(f"seed {seed}  RLlib  {wall:6.1f} s   {stdout.strip().splitlines()[-1]}", flush=True)
    flowrl, sb3 = statistics.median(times["flowrl"]), statistics.median(times["sb3"])
    print(f"\nmedian wall time to a mean return of 475 on CartPole-v1 (from process start):")
    print(f"  flowrl {flowrl:6.1f} s   SB3 {sb3:6.1f} s   ratio flowrl/SB3 {flowrl / sb3:.2f} (goal <= 0.5)")
    if have_rllib:
        print(f"  RLlib  {statistics.median(times['rllib']):6.1f} s")
    else:
        print("  RLlib: not installed (pip install 'ray[rllib]' to include it)")


if __name__ == "__main__":
    main()
