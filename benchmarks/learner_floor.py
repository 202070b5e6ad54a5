"""Gradient steps alone, flowrl vs Stable-Baselines3, for the two goals flowrl misses on this
CPU: SAC HalfCheetah-v5 in <= 0.5x SB3's time (benchmarks/mujoco.py --sac) and PPO
ALE/Breakout-v5 at >= 2x SB3's steps/s (benchmarks/atari.py), 100k env steps each.

    python benchmarks/learner_floor.py [--sac-steps 300] [--breakout-batches 4]

Both runs take the gradient steps SB3 takes with the same settings: SAC 90k of 256 rows (one
per env step after learning_starts 10k), PPO Breakout 1,563 SGD steps of 256 frames (100k /
1,024 frames x 4 epochs x 4 minibatches). Either goal asks flowrl's whole run to take at most
half of SB3's, so flowrl's gradient steps alone must take at most half of SB3's gradient steps
plus sampling. This script times both learners' steps, each in a fresh process (flowrl's with
its operators and the threads a run's learner gets, SB3's `train()` with its default threads),
and for SAC also the dense products no step avoids: 18 products of a 256-row input with a
256x256 hidden layer (forward, input gradient and weight gradient through the twin critics and
the actor; SB3 does 20, as its actor loss also takes the critics' weight gradients).
"""

from __future__ import annotations

import argparse
import sys

from vs_peers import ROOT, THROUGHPUT_FLOWRL_SCRIPT, THROUGHPUT_SB3_SCRIPT, timed

SAC_GRAD_STEPS = 90_000        # 100k env steps, learning_starts 10k, one step per env step
SAC_PRODUCTS_PER_STEP = 18
BREAKOUT_SGD_STEPS = 1_563     # 100k / 1,024 x 4 epochs x 4 minibatches of 256

PRODUCT_SCRIPT = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn(256, 256), torch.randn(256, 256)
for _ in range(50):
    a @ b
t0 = time.perf_counter()
for _ in range(400):
    a @ b
print("RESULT", (time.perf_counter() - t0) / 400)
"""

FLOWRL_BREAKOUT_SCRIPT = r"""
import sys, time
import numpy as np
from flowrl.experiment import load_experiments
from flowrl.operators import TrainOneStep
from flowrl.plan import PlanContext
from flowrl.plans.ppo import ppo_loss
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch

batches = int(sys.argv[1])
(exp,) = load_experiments("examples/ppo_breakout.yaml", [], seed=0)
config = exp.config
workers = WorkerSet(**config.worker_kwargs(exp.env))
policy, n, rng = workers.policy, config.train_batch_size, np.random.default_rng(0)
obs = rng.integers(0, 255, (n, *policy.observation_space.shape), dtype=np.uint8)
out = policy.compute_actions(obs)
batch = SampleBatch({"obs": obs, "actions": out.actions, "action_logp": out.logp, "vf_preds": out.values,
                     "advantages": rng.standard_normal(n).astype(np.float32),
                     "value_targets": rng.standard_normal(n).astype(np.float32)})
train = TrainOneStep(workers, lambda p, b: ppo_loss(p, b, config, config.clip_param, config.kl_coeff),
                     num_sgd_iter=config.num_sgd_iter, sgd_minibatch_size=config.sgd_minibatch_size,
                     grad_clip=config.grad_clip)
train.setup(PlanContext(executor=None))   # only its counters are used
train(batch)
t0 = time.perf_counter()
for _ in range(batches):
    train(batch)
sgd_steps = batches * config.num_sgd_iter * (n // config.sgd_minibatch_size)
print("RESULT", (time.perf_counter() - t0) / sgd_steps, workers.learner_num_threads)
"""

SB3_BREAKOUT_SCRIPT = r"""
import sys, time
import ale_py, gymnasium as gym, torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.vec_env import VecFrameStack

batches = int(sys.argv[1])
gym.register_envs(ale_py)
env = VecFrameStack(make_atari_env("BreakoutNoFrameskip-v4", n_envs=8, seed=0), n_stack=4)
model = PPO("CnnPolicy", env, n_steps=128, n_epochs=4, batch_size=256, learning_rate=2.5e-4, clip_range=0.1,
            ent_coef=0.01, vf_coef=0.5, seed=0, device="cpu", verbose=0)
model.learn(total_timesteps=1024)   # one rollout of 8 x 128 frames, trained once
t0 = time.perf_counter()
for _ in range(batches):
    model.train()                    # 4 epochs x 4 minibatches over the same rollout
print("RESULT", (time.perf_counter() - t0) / (batches * 16), torch.get_num_threads())
"""


def result(script: str, *args: object) -> list[float]:
    _, out = timed([sys.executable, "-c", script, *map(str, args)], ROOT)
    return [float(x) for x in out.split("RESULT")[-1].split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sac-steps", type=int, default=300)
    parser.add_argument("--breakout-batches", type=int, default=4)
    args = parser.parse_args()

    print("SAC HalfCheetah-v5, 256-row gradient steps (90k in a 100k-step run):", flush=True)
    (mine,) = result(THROUGHPUT_FLOWRL_SCRIPT, "sac_halfcheetah", args.sac_steps)
    theirs, threads = result(THROUGHPUT_SB3_SCRIPT, "sac_halfcheetah", args.sac_steps, 0)
    (product,) = result(PRODUCT_SCRIPT, int(threads))
    floor = SAC_PRODUCTS_PER_STEP * product
    print(f"  flowrl {1e3 / mine:.2f} ms/step, SB3 train() {1e3 / theirs:.2f} ms/step ({int(threads)} threads): "
          f"flowrl/SB3 {theirs / mine:.2f}")
    print(f"  one 256x256 product {product * 1e3:.3f} ms; the step's {SAC_PRODUCTS_PER_STEP} {floor * 1e3:.2f} ms "
          f"= {floor * mine:.2f} of flowrl's step and {floor * theirs:.2f} of SB3's (the goal needs flowrl's "
          "whole step at about 0.5 of SB3's)")
    print(f"  for the run: flowrl {SAC_GRAD_STEPS / mine:.0f} s, SB3 {SAC_GRAD_STEPS / theirs:.0f} s of gradient "
          f"steps; the products alone {SAC_GRAD_STEPS * floor:.0f} s", flush=True)

    print("PPO Breakout, SGD steps of 256 frames through the Nature CNN (1,563 in a 100k-step run):", flush=True)
    mine, threads = result(FLOWRL_BREAKOUT_SCRIPT, args.breakout_batches)
    theirs, sb3_threads = result(SB3_BREAKOUT_SCRIPT, args.breakout_batches)
    print(f"  flowrl {mine * 1e3:.1f} ms/step ({int(threads)} threads), SB3 train() {theirs * 1e3:.1f} ms/step "
          f"({int(sb3_threads)} threads): flowrl/SB3 {mine / theirs:.2f}")
    print(f"  for the run: flowrl {BREAKOUT_SGD_STEPS * mine:.0f} s, SB3 {BREAKOUT_SGD_STEPS * theirs:.0f} s of "
          "SGD steps (the goal, 2x SB3's steps/s, needs flowrl's whole run in half of SB3's)")


if __name__ == "__main__":
    main()
