"""The GPU learner, checked and measured: learner throughput (gradient steps/s) on each device
given, then short end-to-end runs with the learner on the first one.

    python benchmarks/device_check.py --devices cuda,cpu [--scale 1.0]

- PPO learner (needs ale-py: `flowrl[atari]`): examples/ppo_breakout.yaml's Nature CNN on a
  train batch of ALE/Breakout-v5 frames (uint8 84x84x4, the `atari` preset), num_sgd_iter x
  minibatches per batch, the batch moved to the device each time.
- SAC learner: 256x256 networks, 256-row minibatches from a replay buffer (benchmarks/vs_peers.py's
  throughput row), on HalfCheetah-v5 with mujoco installed, else Pendulum-v1.
- End to end: PPO on Breakout (sampling in the driver with the CPU copy of the policy) and SAC,
  env steps/s and the last mean return, `--scale` x the default budgets.
`benchmarks/device_check.sh` installs what it needs and runs this on a machine with CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

# This directory holds mujoco.py and atari.py (benchmarks), which would hide the packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from flowrl.device import resolve_device
from flowrl.experiment import load_experiments
from flowrl.algorithm import Algorithm
from flowrl.operators import TrainOneStep, UpdateTargetNetwork
from flowrl.operators.replay import Replay, ReplayBuffer
from flowrl.plan import Plan
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.stream import Stream

HAS_ALE = importlib.util.find_spec("ale_py") is not None
HAS_MUJOCO = importlib.util.find_spec("mujoco") is not None
SAC_ENV = "HalfCheetah-v5" if HAS_MUJOCO else "Pendulum-v1"


def ppo_experiment(device: str, **config):
    overrides = [("config.learner_device", device)] + [(f"config.{k}", v) for k, v in config.items()]
    (exp,) = load_experiments("examples/ppo_breakout.yaml", overrides, seed=0)
    return exp


def sac_experiment(device: str, **config):
    overrides = [("env", SAC_ENV), ("config.learner_device", device)] + [(f"config.{k}", v) for k, v in config.items()]
    (exp,) = load_experiments("examples/sac_pendulum.yaml", overrides, seed=0)
    return exp


def timed_steps(plan: Plan, steps: int) -> float:
    """Seconds for `steps` plan steps after 3 of warm-up (CUDA kernels, allocator)."""
    for _ in range(3):
        plan.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        plan.step()
    return time.perf_counter() - t0


def ppo_learner(device: str, batches: int) -> float:
    """Gradient steps/s of PPO's TrainOneStep on one train batch of frames, trained `batches` times."""
    from flowrl.plans.ppo import ppo_loss

    exp = ppo_experiment(device)
    config = exp.config
    workers = WorkerSet(learner_device=resolve_device(device), **config.worker_kwargs(exp.env))
    samples = []
    while sum(len(b) for b in samples) < config.train_batch_size:
        samples.append(workers.local_worker.sample())
    batch = SampleBatch.concat(samples)
    n = len(batch)
    batch = batch.with_columns(advantages=np.random.default_rng(0).standard_normal(n).astype(np.float32),
                               value_targets=np.zeros(n, np.float32))
    train = TrainOneStep(workers, lambda p, b: ppo_loss(p, b, config, config.clip_param, 0.0), config.num_sgd_iter,
                         config.sgd_minibatch_size, config.grad_clip)
    with Plan(Stream.source(lambda: iter(lambda: batch, None)).then(train)) as plan:
        seconds = timed_steps(plan, batches)
    workers.local_worker.close()
    return batches * config.num_sgd_iter * -(-n // config.sgd_minibatch_size) / seconds


def sac_learner(device: str, steps: int) -> float:
    """Gradient steps/s of SAC on 256-row minibatches (256x256 networks) from a filled buffer."""
    from flowrl.plans.sac import sac_loss

    exp = sac_experiment(device, model={"hidden": [256, 256], "activation": "relu"})
    config = exp.config
    workers = WorkerSet(learner_device=resolve_device(device), **config.worker_kwargs(exp.env))
    buffer = ReplayBuffer(100_000, n_step=config.n_step, gamma=config.gamma, seed=0)
    while len(buffer) < 2_000:
        buffer.add(workers.local_worker.sample())
    train = (Replay(buffer, 256).then(TrainOneStep(workers, lambda p, b: sac_loss(p, b, config),
                                                   grad_clip=config.grad_clip))
             .then(UpdateTargetNetwork(workers, 1, config.tau)))
    with Plan(train) as plan:
        seconds = timed_steps(plan, steps)
    workers.local_worker.close()
    return steps / seconds


def end_to_end(exp, env_steps: int) -> str:
    t0 = time.perf_counter()
    with Algorithm(exp) as algo:
        result = algo.train()
        while result["timesteps_total"] < env_steps:
            result = algo.train()
        device = algo.policy.device
    seconds = time.perf_counter() - t0
    return (f"{result['timesteps_total']} env steps in {seconds:.1f} s ({result['timesteps_total'] / seconds:.0f} "
            f"env steps/s), learner on {device}, episode_return_mean {result.get('episode_return_mean')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="cuda,cpu", help="learner devices to measure; the first runs end to end")
    parser.add_argument("--scale", type=float, default=1.0, help="x the default budgets (0.05 for a smoke test)")
    args = parser.parse_args()
    devices = args.devices.split(",")
    scale = args.scale
    if not HAS_ALE:
        print("ale-py is not installed (pip install 'flowrl[atari]'): PPO on Breakout is skipped", flush=True)
    print(f"learner throughput, gradient steps/s (PPO: Nature CNN on Breakout frames; SAC: 256x256 on {SAC_ENV}):",
          flush=True)
    for device in devices:
        ppo = f"{ppo_learner(device, max(1, int(20 * scale))):8.1f}" if HAS_ALE else "       -"
        sac = sac_learner(device, max(5, int(1_000 * scale)))
        print(f"  {device:7s} PPO {ppo}   SAC {sac:8.1f}", flush=True)
    device = devices[0]
    ppo_steps, sac_steps = max(1_024, int(50_000 * scale)), max(500, int(20_000 * scale))
    if HAS_ALE:
        print("PPO ALE/Breakout-v5:", end_to_end(ppo_experiment(device), ppo_steps), flush=True)
    print(f"SAC {SAC_ENV}:", end_to_end(sac_experiment(device, learning_starts=min(1_000, sac_steps // 2),
                                                       evaluation_interval=0), sac_steps), flush=True)


if __name__ == "__main__":
    main()
