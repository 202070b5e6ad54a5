"""Rollout throughput (env steps/s including policy inference), flowrl vs a tight loop, in one run.

    python benchmarks/sampling.py [--seconds 3] [--rounds 5] [--num-envs 8] [--fragment 512]

CartPole-v1 with the default MLP policy:
  (1) a tight single-process loop over the same vector env and policy (no bookkeeping),
      counting transitions only (not gymnasium's autoreset steps), as flowrl does;
  (2) flowrl, local executor (one worker in the driver);
  (3) flowrl, Ray executor with 2 rollout workers (asynchronous gather).
Goals: (2)/(1) >= 0.9 and (3)/(1) >= 1.5 on a 2-core machine.
Then an env whose step sleeps 1 ms (I/O bound), 1 env and 256 steps per call per worker:
8 Ray workers vs 1 Ray worker, goal >= 6x.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from flowrl import Plan, make_executor
from flowrl.envs import make_vector_env
from flowrl.operators import Gather, ParallelRollouts
from flowrl.policy import TorchPolicy, obs_to_array
from flowrl.rollout import WorkerSet


def tight_loop(seconds: float, num_envs: int) -> float:
    torch.set_num_threads(1)
    env = make_vector_env("CartPole-v1", num_envs)
    policy = TorchPolicy(env.single_observation_space, env.single_action_space, seed=0)
    obs, _ = env.reset(seed=0)
    resetting = np.zeros(num_envs, dtype=bool)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            out = policy.compute_actions(obs_to_array(env.single_observation_space, obs))
            obs, _, terminated, truncated, _ = env.step(out.env_actions)
            # Count transitions only: a sub-env's step right after its episode ended is
            # gymnasium's (next-step) autoreset, not an env step. flowrl counts the same way.
            steps += num_envs - int(resetting.sum())
            resetting = terminated | truncated
    return steps / (time.perf_counter() - t0)


def flowrl_rate(seconds: float, executor: str, num_workers: int, env: str = "CartPole-v1", num_envs: int = 8,
                fragment: int = 128, gather: Gather = Gather.ASYNC) -> float:
    workers = WorkerSet(num_workers=num_workers, env=env, num_envs_per_worker=num_envs,
                        rollout_fragment_length=fragment, seed=0,
                        num_cpus_per_worker=min(1.0, 2.0 / max(num_workers, 1)))
    with Plan(ParallelRollouts(workers, gather), executor=make_executor(executor, num_cpus=2)) as plan:
        for _ in range(max(num_workers, 1) * 2):  # warm up: actors started, first batches in
            plan.step()
        start = plan.counters["num_env_steps_sampled"]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            plan.step()
        return (plan.counters["num_env_steps_sampled"] - start) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repeats; the best of each is kept")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--fragment", type=int, default=512, help="rollout_fragment_length of (2) and (3)")
    args = parser.parse_args()

    # The machine is shared and noisy: interleave the measurements and keep each one's best.
    tight = local = ray2 = 0.0
    for _ in range(args.rounds):
        tight = max(tight, tight_loop(args.seconds, args.num_envs))
        local = max(local, flowrl_rate(args.seconds, "local", 0, num_envs=args.num_envs, fragment=args.fragment))
        ray2 = max(ray2, flowrl_rate(args.seconds, "ray", 2, num_envs=args.num_envs, fragment=args.fragment))
    print(f"CartPole-v1, {args.num_envs} envs per worker, {args.fragment} steps per sample() call, MLP policy:")
    print(f"  (1) tight loop            {tight:10,.0f} steps/s")
    print(f"  (2) flowrl local          {local:10,.0f} steps/s   (2)/(1) = {local / tight:.2f} (goal >= 0.9)")
    print(f"  (3) flowrl 2 Ray workers  {ray2:10,.0f} steps/s   (3)/(1) = {ray2 / tight:.2f} (goal >= 1.5)")

    sleepy = "flowrl.testing_envs:SleepyCartPole"
    one = eight = 0.0
    for _ in range(args.rounds):
        one = max(one, flowrl_rate(args.seconds, "ray", 1, env=sleepy, num_envs=1, fragment=256))
        eight = max(eight, flowrl_rate(args.seconds, "ray", 8, env=sleepy, num_envs=1, fragment=256))
    print("env step sleeps 1 ms, 1 env per worker, 256 steps per sample() call:")
    print(f"  1 Ray worker {one:8,.0f} steps/s   8 Ray workers {eight:8,.0f} steps/s   ratio {eight / one:.2f} (goal >= 6)")


if __name__ == "__main__":
    main()
