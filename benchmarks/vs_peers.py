"""flowrl vs Stable-Baselines3 (and RLlib when `ray[rllib]` is installed) on the same machine, in
one run: wall time from process start until the mean return of the last 100 training episodes
reaches 475 on CartPole-v1, median of 3 seeds; then the same for DQN and SAC (below).

    python benchmarks/vs_peers.py [--seeds 0,1,2] [--only ppo,dqn,sac,throughput]

flowrl: `flowrl run examples/ppo_cartpole.yaml --seed S` (stops at 475 or 100k steps).
SB3: PPO with RL-Zoo's CartPole hyperparameters (n_envs 8, n_steps 32, batch 256, 20 epochs,
gae_lambda 0.8, gamma 0.98, learning rate and clip range linearly decayed from 1e-3 and 0.2 over
100k steps), stopped by a callback at the same criterion (SB3's 100-episode info buffer).
Each is a fresh process; the time includes interpreter start and imports. Goal: flowrl <= 0.5x SB3.

DQN: until the greedy 10-episode evaluation mean reaches 475 on CartPole-v1, evaluated every 2,000
env steps by both. flowrl: examples/dqn_cartpole.yaml (stops at 475 or 100k steps). SB3: RL-Zoo's
CartPole DQN (lr 2.3e-3, batch 64, buffer 100k, learning_starts 1000, target_update_interval 10,
train_freq 256, gradient_steps 128, epsilon 1 -> 0.04 over the first 8,000 steps (RL-Zoo's
exploration_fraction 0.16 of its 50k steps), 256x256 net), an EvalCallback (10 deterministic
episodes every 2,000 steps) stopping at 475, budget 100k steps.
SAC: until the mean training return reaches -200 on Pendulum-v1, over the last N episodes for both,
N = examples/sac_pendulum.yaml's metrics_num_episodes_for_smoothing. flowrl: that example (budget
20k steps). SAC: RL-Zoo's Pendulum SAC (lr 1e-3, SB3's other defaults: 256x256 nets, batch 256,
one gradient step per env step, learning_starts 100), budget 50k steps.
Learner throughput: gradient steps per second on 256-row minibatches from a filled buffer, both with
256x256 networks (SB3's `train()`; flowrl's Replay -> TrainOneStep -> UpdateTargetNetwork).
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

DQN_SB3_SCRIPT = r"""
import sys
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env

seed, budget = int(sys.argv[1]), 100_000
env = make_vec_env("CartPole-v1", n_envs=1, seed=seed)
evaluation = EvalCallback(make_vec_env("CartPole-v1", n_envs=1, seed=seed + 1000), n_eval_episodes=10, eval_freq=2000,
                          deterministic=True, callback_on_new_best=StopTrainingOnRewardThreshold(475), verbose=0)
model = DQN("MlpPolicy", env, learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000,
            gamma=0.99, target_update_interval=10, train_freq=256, gradient_steps=128,
            exploration_fraction=8000 / budget, exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[256, 256]),
            seed=seed, device="cpu", verbose=0)
model.learn(total_timesteps=budget, callback=evaluation)
print("RESULT", model.num_timesteps, evaluation.best_mean_reward)
"""

SAC_SB3_SCRIPT = r"""
import sys
import numpy as np
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback

seed, window = int(sys.argv[1]), int(sys.argv[2])

class StopAtMinus200(BaseCallback):
    def _on_step(self):  # the mean over the last `window` episodes, as flowrl's episode_return_mean
        returns = [e["r"] for e in list(self.model.ep_info_buffer)[-window:]]
        return not (returns and np.mean(returns) >= -200)

model = SAC("MlpPolicy", "Pendulum-v1", learning_rate=1e-3, seed=seed, device="cpu", verbose=0)
model.learn(total_timesteps=50_000, callback=StopAtMinus200())
print("RESULT", model.num_timesteps, np.mean([e["r"] for e in list(model.ep_info_buffer)[-window:]]))
"""

THROUGHPUT_SB3_SCRIPT = r"""
import sys, time
import torch
from stable_baselines3 import DQN, SAC

algo, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
if algo == "dqn":
    model = DQN("MlpPolicy", "CartPole-v1", batch_size=256, learning_starts=5000, policy_kwargs=dict(net_arch=[256, 256]),
                device="cpu", seed=0, verbose=0)
else:  # "sac" on Pendulum-v1, "sac_halfcheetah" on HalfCheetah-v5 (benchmarks/learner_floor.py)
    env_id = "HalfCheetah-v5" if algo == "sac_halfcheetah" else "Pendulum-v1"
    model = SAC("MlpPolicy", env_id, batch_size=256, learning_starts=5000, device="cpu", seed=0, verbose=0)
model.learn(total_timesteps=5000)          # fills the buffer; no training before learning_starts
model.train(gradient_steps=20, batch_size=256)
t0 = time.perf_counter()
model.train(gradient_steps=steps, batch_size=256)
print("RESULT", steps / (time.perf_counter() - t0), torch.get_num_threads())
"""

THROUGHPUT_FLOWRL_SCRIPT = r"""
import sys, time
from flowrl.experiment import load_experiments
from flowrl.operators.replay import Replay, ReplayBuffer
from flowrl.operators import TrainOneStep, UpdateTargetNetwork
from flowrl.plan import Plan
from flowrl.rollout import WorkerSet

algo, steps = sys.argv[1], int(sys.argv[2])
example = {"dqn": "examples/dqn_cartpole.yaml", "sac": "examples/sac_pendulum.yaml",
           "sac_halfcheetah": "examples/sac_halfcheetah.yaml"}[algo]
(exp,) = load_experiments(example, [("config.model", {"hidden": [256, 256], "activation": "relu"})], seed=0)
config = exp.config
workers = WorkerSet(**config.worker_kwargs(exp.env))   # the driver's worker: one torch thread, as in a run
buffer = ReplayBuffer(100_000, n_step=config.n_step, gamma=config.gamma, seed=0)
while len(buffer) < 5000:
    buffer.add(workers.local_worker.sample())
if algo == "dqn":
    from flowrl.plans.dqn import dqn_loss as loss_fn
    every, tau = config.target_network_update_freq, 1.0
else:
    from flowrl.plans.sac import sac_loss as loss_fn
    every, tau = 1, config.tau
train = (Replay(buffer, 256).then(TrainOneStep(workers, lambda p, b: loss_fn(p, b, config), grad_clip=config.grad_clip))
         .then(UpdateTargetNetwork(workers, every, tau)))
with Plan(train) as plan:
    for _ in range(20):
        plan.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        plan.step()
    print("RESULT", steps / (time.perf_counter() - t0))
"""


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def ppo(seeds: list[int], out: str, flowrl_bin: str) -> None:
    times: dict[str, list[float]] = {"flowrl": [], "sb3": [], "rllib": []}
    # ray ships ray.rllib, but it imports only with ray[rllib]'s extra dependencies.
    have_rllib = subprocess.run([sys.executable, "-c", "import ray.rllib.algorithms.ppo"],
                                capture_output=True).returncode == 0
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
    print("\nmedian wall time to a mean return of 475 on CartPole-v1 (from process start):")
    print(f"  flowrl {flowrl:6.1f} s   SB3 {sb3:6.1f} s   ratio flowrl/SB3 {flowrl / sb3:.2f} (goal <= 0.5)")
    if have_rllib:
        print(f"  RLlib  {statistics.median(times['rllib']):6.1f} s")
    else:
        print("  RLlib: not installed (pip install 'ray[rllib]' to include it)")


def off_policy(name: str, seeds: list[int], out: str, flowrl_bin: str, example: str, sb3_script: str,
               sb3_args: list[str], criterion: str) -> None:
    """flowrl's example against SB3's script, seed by seed; the median wall times and their ratio."""
    times: dict[str, list[float]] = {"flowrl": [], "sb3": []}
    for seed in seeds:
        wall, stdout = timed([flowrl_bin, "run", example, "--seed", str(seed), "--quiet", "--output-dir", out], ROOT)
        times["flowrl"].append(wall)
        print(f"{name} seed {seed}  flowrl {wall:6.1f} s   {stdout.strip().splitlines()[-1]}", flush=True)
        wall, stdout = timed([sys.executable, "-c", sb3_script, str(seed), *sb3_args], ROOT)
        times["sb3"].append(wall)
        print(f"{name} seed {seed}  SB3    {wall:6.1f} s   {stdout.strip().splitlines()[-1]}", flush=True)
    flowrl, sb3 = statistics.median(times["flowrl"]), statistics.median(times["sb3"])
    print(f"\nmedian wall time until {criterion} (from process start):")
    print(f"  flowrl {flowrl:6.1f} s   SB3 {sb3:6.1f} s   ratio flowrl/SB3 {flowrl / sb3:.2f} (goal <= 0.5)\n")


def throughput() -> None:
    """Gradient steps per second on 256-row minibatches, 256x256 networks, each in a fresh process.
    flowrl's learner runs on one torch thread (as in a run's driver); SB3 with its default
    (one per core) and with one."""
    print("learner throughput, gradient steps/s on 256-row minibatches (256x256 networks):")
    for algo, steps in (("dqn", 500), ("sac", 200)):
        _, out = timed([sys.executable, "-c", THROUGHPUT_FLOWRL_SCRIPT, algo, str(steps)], ROOT)
        mine = float(out.split("RESULT")[-1])
        line = f"  {algo.upper()}  flowrl {mine:7.1f}"
        for threads in (0, 1):
            _, out = timed([sys.executable, "-c", THROUGHPUT_SB3_SCRIPT, algo, str(steps), str(threads)], ROOT)
            theirs, used = out.split("RESULT")[-1].split()
            line += f"   SB3 train() ({used} threads) {float(theirs):7.1f} (flowrl/SB3 {mine / float(theirs):.2f})"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="ppo,dqn,sac,throughput", help="comma-separated: ppo, dqn, sac, throughput")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    only = args.only.split(",")
    flowrl_bin = str(Path(sys.executable).with_name("flowrl"))
    with tempfile.TemporaryDirectory() as out:
        if "ppo" in only:
            ppo(seeds, out, flowrl_bin)
        if "dqn" in only:
            off_policy("DQN", seeds, out, flowrl_bin, "examples/dqn_cartpole.yaml", DQN_SB3_SCRIPT, [],
                       "a greedy 10-episode mean of 475 on CartPole-v1")
        if "sac" in only:
            import yaml

            (spec,) = yaml.safe_load((ROOT / "examples" / "sac_pendulum.yaml").read_text()).values()
            window = spec["config"].get("metrics_num_episodes_for_smoothing", 100)
            off_policy("SAC", seeds, out, flowrl_bin, "examples/sac_pendulum.yaml", SAC_SB3_SCRIPT, [str(window)],
                       f"a mean training return of -200 over the last {window} episodes on Pendulum-v1")
        if "throughput" in only:
            throughput()


if __name__ == "__main__":
    main()
