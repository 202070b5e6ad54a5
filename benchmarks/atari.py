"""PPO on ALE/Breakout-v5, flowrl vs Stable-Baselines3, on this machine in one run.

    python benchmarks/atari.py [--steps 100000] [--seed 0] [--only local,ray,sb3]

End-to-end env steps/s (sampling and learning, from process start) and the peak memory of each
run's process tree. flowrl: examples/ppo_breakout.yaml (RL-Zoo's Atari PPO: 8 envs x 128 steps,
4 epochs of 256, the atari preset) on the local executor, and on Ray with 2 rollout workers of 4
envs each (the same 1,024-step batches). SB3: PPO CnnPolicy with RL-Zoo's Atari hyperparameters on
`make_atari_env("BreakoutNoFrameskip-v4", n_envs=8)` and VecFrameStack(4). Goal: flowrl >= 2x SB3's
steps/s. Needs pip install 'flowrl[atari,bench]'.
"""

from __future__ import annotations

import argparse

from workloads import flowrl_run, peer_run, row

SB3_SCRIPT = r"""
import sys
import ale_py
import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.vec_env import VecFrameStack

steps, seed = int(sys.argv[1]), int(sys.argv[2])
gym.register_envs(ale_py)  # the NoFrameskip-v4 ids
env = VecFrameStack(make_atari_env("BreakoutNoFrameskip-v4", n_envs=8, seed=seed), n_stack=4)
model = PPO("CnnPolicy", env, n_steps=128, n_epochs=4, batch_size=256, learning_rate=2.5e-4, clip_range=0.1,
            ent_coef=0.01, vf_coef=0.5, seed=seed, device="cpu", verbose=0)
model.learn(total_timesteps=steps)
returns = [e["r"] for e in model.ep_info_buffer]
print("RESULT", model.num_timesteps, np.mean(returns) if returns else float("nan"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="local,ray,sb3")
    args = parser.parse_args()
    only = args.only.split(",")
    print(f"PPO ALE/Breakout-v5, {args.steps:,} env steps", flush=True)
    results = {}
    if "local" in only:
        results["flowrl local"] = flowrl_run("examples/ppo_breakout.yaml", args.steps, args.seed)
        print(row("flowrl local", results["flowrl local"]), flush=True)
    if "ray" in only:
        results["flowrl Ray, 2 workers"] = flowrl_run(
            "examples/ppo_breakout.yaml", args.steps, args.seed, "--executor", "ray", "--num-workers", "2",
            "--set", "config.num_envs_per_worker=4")
        print(row("flowrl Ray, 2 workers", results["flowrl Ray, 2 workers"]), flush=True)
    if "sb3" in only:
        results["SB3"] = peer_run(SB3_SCRIPT, args.steps, args.seed)
        print(row("SB3 PPO CnnPolicy", results["SB3"]), flush=True)
    if "SB3" in results:
        for name, m in results.items():
            if name != "SB3":
                print(f"  {name} / SB3 steps/s: {m.steps_per_s / results['SB3'].steps_per_s:.2f}x (goal >= 2)")


if __name__ == "__main__":
    main()
