"""Where the learner computes: its device, its torch threads, and batches moved there.

The learner (the driver's policy: model, optimizer, loss) runs on `learner_device`; rollout
workers always act on the CPU. `auto` is the first CUDA device when `num_gpus` > 0 and CUDA is
there, else the CPU.

>>> resolve_device("auto", num_gpus=0)
device(type='cpu')
>>> resolve_device("tpu")
Traceback (most recent call last):
...
flowrl.config.ConfigError: learner_device: must be auto, cpu, cuda or cuda:N, got 'tpu'
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from flowrl.config import ConfigError, check_learner_device

import math
import os


def resolve_device(learner_device: str = "auto", num_gpus: float = 0.0) -> torch.device:
    """The torch device of `learner_device` (auto | cpu | cuda | cuda:N); ConfigError when it
    names CUDA and this process has no CUDA device (or not that one)."""
    check_learner_device(learner_device)
    if learner_device == "auto":
        return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")
    device = torch.device(learner_device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("learner_device", f"{learner_device!r} asked for, but this torch has no CUDA device "
                                                "(install a CUDA build of torch, or use learner_device: cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("learner_device", f"{learner_device!r} asked for, but there are "
                                                f"{torch.cuda.device_count()} CUDA devices")
    return device


def batch_to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A train batch's tensors on `device`, moved once: through pinned memory, without blocking,
    to CUDA; unchanged (no copy) on the CPU."""
    if device.type == "cpu":
        return tensors
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in tensors.items()}


def cpu_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of a state dict's tensors on the CPU, what rollout workers and checkpoints get
    (one copy whether they were on the CPU or a GPU)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def default_learner_threads(num_workers: int, num_cpus_per_worker: float, cpu_count: int | None = None,
                            acting_in_turn: bool = False) -> int:
    """The cores the rollout workers and the driver's acting leave free: cpu_count - ceil(num_workers
    x num_cpus_per_worker) - 1, at least 1. With `acting_in_turn` (no remote workers, no policy
    server: the driver's own worker samples, then the learner learns) nothing else runs while the
    learner does, so it takes every core: on this project's 2-core machine 2 threads made a
    SAC gradient step on 256x256 networks ~1.4x faster and PPO's Nature CNN learner on Breakout
    1.37x (411 against 301 env steps/s end to end), and left PPO and DQN on CartPole's 64x64
    MLPs as fast as one. Oversubscribed cores are worse than one thread: on a busy 2-core machine
    PPO CartPole took 17 s to 475 with a 2-thread learner next to a rollout worker's process
    against 7 s with one, and DQN's gradient steps fell from ~300/s to ~28/s. cpu_count
    defaults to the cores this process may use: OMP_NUM_THREADS where set (Ray sets it to an
    actor's num_cpus, a Tune trial's too), else the CPU affinity mask."""
    cores = cpu_count or usable_cores()
    if acting_in_turn:
        return max(1, cores)
    return max(1, cores - math.ceil(num_workers * num_cpus_per_worker) - 1)


def usable_cores() -> int:
    """OMP_NUM_THREADS when it is a positive integer, else the cores in this process's affinity mask."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def learner_threads(num_threads: int):
    """`num_threads` torch threads while the learner computes. A rollout worker in the same
    process (the driver's, or one of the local executor's) keeps its one thread for acting: on
    the few rows a policy acts on, more threads only wait on each other (a 256x256 Q-network on
    10 rows: 70 us on one thread, milliseconds on two of a busy 2-core machine). Switching costs
    about 2 us."""
    threads = torch.get_num_threads()
    if threads == num_threads:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def move_policy(policy: Any, device: torch.device) -> None:
    """Puts the learner `policy`'s modules (model, target network) on `device`, in place: the
    Parameter objects stay the same, so an optimizer made before still steps them."""
    policy.model.to(device)
    target = getattr(policy, "target_model", None)
    if target is not None:
        target.to(device)
    policy.device = device


def check_ray_gpus(num_gpus: float) -> None:
    """ConfigError (one line) when the Ray cluster joined has fewer GPUs than `num_gpus`: Ray would
    wait for them for ever."""
    import ray

    total = ray.cluster_resources().get("GPU", 0.0)
    if num_gpus > total + 1e-9:
        raise ConfigError("num_gpus", f"the learner asks for {num_gpus:g} GPU{'s' if num_gpus != 1 else ''}, but the "
                                      f"Ray cluster has {total:g}; set num_gpus: 0 (learner_device: cpu) or join a "
                                      "cluster with GPUs (--address)")
