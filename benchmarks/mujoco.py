"""PPO on MuJoCo, flowrl vs Stable-Baselines3, on this machine in one run.

    python benchmarks/mujoco.py [--steps 1000000] [--seeds 0,1,2] [--envs HalfCheetah-v5,Hopper-v5,Walker2d-v5]
    python benchmarks/mujoco.py --sac [--steps 100000] [--seeds 0]

flowrl: `flowrl run examples/ppo_halfcheetah.yaml --set env=ENV` (CleanRL's ppo_continuous_action
settings with the normalize preset). SB3: PPO with its defaults (which are the same settings: 2048
steps, minibatch 64, 10 epochs, 64x64 tanh, lr 3e-4) on VecNormalize, 1 env. Both report the mean
return of the last 100 training episodes (unnormalized rewards) and end-to-end env steps/s, from
process start. Goal on HalfCheetah-v5: return >= 1,442 at 1M steps (CleanRL's v4 figure) on each
seed, and flowrl >= 2x SB3's steps/s.
--sac: SAC HalfCheetah-v5, examples/sac_halfcheetah.yaml against SB3 SAC with RL-Zoo's settings
(SB3's defaults, learning_starts 10,000), 100k env steps by default: return of the last 100
training episodes and wall time. Goal: flowrl <= 0.5x SB3's time at an equal or better return.
Needs pip install 'flowrl[mujoco,bench]'.
"""

from __future__ import annotations

import argparse
import statistics

from workloads import flowrl_run, peer_run, row

SB3_SCRIPT = r"""
import sys
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

env_id, steps, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
env = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), gamma=0.99)
model = PPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0)
model.learn(total_timesteps=steps)
print("RESULT", model.num_timesteps, np.mean([e["r"] for e in model.ep_info_buffer]))
"""

SB3_SAC_SCRIPT = r"""
import sys
import numpy as np
from stable_baselines3 import SAC

env_id, steps, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = SAC("MlpPolicy", env_id, learning_starts=10_000, seed=seed, device="cpu", verbose=0)
model.learn(total_timesteps=steps)
print("RESULT", model.num_timesteps, np.mean([e["r"] for e in model.ep_info_buffer]))
"""


def sac(steps: int, seeds: list[int]) -> None:
    print(f"SAC HalfCheetah-v5, {steps:,} env steps", flush=True)
    for seed in seeds:
        ours = flowrl_run("examples/sac_halfcheetah.yaml", steps, seed)
        print(row(f"flowrl seed {seed}", ours), flush=True)
        theirs = peer_run(SB3_SAC_SCRIPT, "HalfCheetah-v5", steps, seed)
        print(row(f"SB3 SAC seed {seed}", theirs), flush=True)
        print(f"  flowrl/SB3 wall time: {ours.wall_s / theirs.wall_s:.2f}x (goal <= 0.5), return "
              f"{ours.episode_return:.1f} vs {theirs.episode_return:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="1M for PPO, 100k with --sac")
    parser.add_argument("--seeds", default=None, help="0,1,2 for PPO, 0 with --sac")
    parser.add_argument("--envs", default="HalfCheetah-v5,Hopper-v5,Walker2d-v5")
    parser.add_argument("--no-sb3", action="store_true", help="flowrl only")
    parser.add_argument("--sac", action="store_true", help="SAC HalfCheetah-v5 against SB3 SAC")
    args = parser.parse_args()
    seeds = [int(s) for s in (args.seeds or ("0" if args.sac else "0,1,2")).split(",")]
    if args.sac:
        return sac(args.steps or 100_000, seeds)
    args.steps = args.steps or 1_000_000
    for env in args.envs.split(","):
        print(f"PPO {env}, {args.steps:,} env steps", flush=True)
        runs = {"flowrl": [], "SB3": []}
        for seed in seeds:  # interleaved, so that machine noise hits each alike
            runs["flowrl"].append(flowrl_run("examples/ppo_halfcheetah.yaml", args.steps, seed, "--set", f"env={env}"))
            print(row(f"flowrl seed {seed}", runs["flowrl"][-1]), flush=True)
            if not args.no_sb3:
                runs["SB3"].append(peer_run(SB3_SCRIPT, env, args.steps, seed))
                print(row(f"SB3 PPO + VecNormalize seed {seed}", runs["SB3"][-1]), flush=True)
        for name, measured in runs.items():
            if measured:
                print(f"  {name}: return {statistics.mean(m.episode_return for m in measured):.1f} "
                      f"(min {min(m.episode_return for m in measured):.1f}), median "
                      f"{statistics.median(m.steps_per_s for m in measured):.0f} steps/s")
        if runs["SB3"]:
            ratio = statistics.median(m.steps_per_s for m in runs["flowrl"]) / \
                statistics.median(m.steps_per_s for m in runs["SB3"])
            print(f"  flowrl/SB3 steps/s: {ratio:.2f}x (goal >= 2)", flush=True)


if __name__ == "__main__":
    main()
