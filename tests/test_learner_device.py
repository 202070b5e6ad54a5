"""The learner's device (flowrl.device), its torch threads, and the Nature CNN: everything here
runs with `learner_device: cpu` through the code path a GPU learner takes
(benchmarks/device_check.sh runs the CUDA side on a machine with a GPU)."""

import copy
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import flowrl
from flowrl.checkpoints import _load_tensors
from flowrl.cli import main
from flowrl.config import ConfigError, parse_config
from flowrl.device import batch_to_device, check_ray_gpus, default_learner_threads, learner_threads, resolve_device
from flowrl.operators import TrainOneStep
from flowrl.plan import Plan
from flowrl.plans import PPOConfig
from flowrl.policy import NatureCNN, TorchPolicy
from flowrl.q_policy import QNetwork
from flowrl.rollout import WorkerSet
from flowrl.stream import Stream

NO_CUDA = not torch.cuda.is_available()
TINY = {"PPO": ("CartPole-v1", {"train_batch_size": 64, "sgd_minibatch_size": 32, "num_sgd_iter": 2,
                                "num_envs_per_worker": 2, "rollout_fragment_length": 32}),
        "DQN": ("CartPole-v1", {"learning_starts": 32, "timesteps_per_iteration": 64, "train_batch_size": 16,
                                "num_envs_per_worker": 1, "rollout_fragment_length": 4, "evaluation_interval": 0}),
        "SAC": ("Pendulum-v1", {"learning_starts": 32, "timesteps_per_iteration": 48, "train_batch_size": 16,
                                "num_envs_per_worker": 1, "rollout_fragment_length": 4, "evaluation_interval": 0,
                                "model": {"hidden": [16, 16], "activation": "relu"}})}


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", sorted(TINY))
def test_a_learner_on_the_cpu_device_trains(plan):
    env, config = TINY[plan]
    with flowrl.build(plan, env=env, config={**config, "learner_device": "cpu", "seed": 0}) as algo:
        before = copy.deepcopy(algo.policy.model.state_dict())
        results = [algo.train() for _ in range(2)]
        after = algo.policy.model.state_dict()
    assert algo.policy.device == torch.device("cpu")
    assert results[-1]["num_env_steps_trained"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it learned


@pytest.mark.parametrize("config, key, message", [
    ({"learner_device": "tpu"}, "config.learner_device", "must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ({"learner_device": "cuda:x"}, "config.learner_device", "must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ({"num_gpus": -1}, "config.num_gpus", "must be >= 0, got -1.0"),
    ({"num_gpus": "one"}, "config.num_gpus", "expected a number, got 'one'"),
    ({"num_learner_threads": 0}, "config.num_learner_threads", "must be >= 1 or null, got 0"),
])
def test_bad_device_settings_raise_naming_the_key(config, key, message):
    with pytest.raises(ConfigError) as e:
        parse_config(PPOConfig, config)
    assert (e.value.key, e.value.message) == (key, message)


def test_auto_is_the_cpu_without_gpus_asked_for_or_present():
    assert resolve_device("auto", num_gpus=0) == torch.device("cpu")
    assert resolve_device("cpu", num_gpus=1) == torch.device("cpu")
    if NO_CUDA:
        assert resolve_device("auto", num_gpus=1) == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, capsys):
    argv = ["train", "--run", "PPO", "--env", "CartPole-v1", "--stop", "{timesteps_total: 64}",
            "--config", "{learner_device: cuda}", "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flowrl: error: ")
    assert "config.learner_device: 'cuda' asked for, but this torch has no CUDA device" in err
    assert not list(tmp_path.iterdir())


def test_a_ray_cluster_without_gpus_is_refused_in_one_line(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"^num_gpus: the learner asks for 1 GPU, but the Ray cluster has 0; "):
        check_ray_gpus(1)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    check_ray_gpus(1)  # fits


def test_a_tune_trial_reserves_the_learners_gpu_in_its_own_bundle():
    pytest.importorskip("ray.tune")
    from flowrl.tune import trial_resources

    bundles = trial_resources(PPOConfig, {"num_workers": 2, "num_gpus": 1}).bundles
    assert bundles == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert trial_resources(PPOConfig, {"num_workers": 1}).bundles == [{"CPU": 1.0}, {"CPU": 1.0}]


# ---- what moves where ---------------------------------------------------------------------------
def test_weights_for_the_workers_are_cpu_copies():
    workers = WorkerSet(num_workers=1, env="CartPole-v1", num_envs_per_worker=1, rollout_fragment_length=4, seed=0)
    weights = workers.local_worker.get_weights()
    params = {p.data_ptr() for p in workers.policy.model.parameters()}
    assert all(w.device.type == "cpu" for w in weights.values())
    assert not params & {w.data_ptr() for w in weights.values()}  # copies: training does not change them


def test_on_the_cpu_a_batch_is_not_copied():
    tensors = {"obs": torch.zeros(4, 3)}
    assert batch_to_device(tensors, torch.device("cpu")) is tensors


def test_the_sampling_copy_follows_the_learner_before_each_sample():
    """What a GPU learner's driver worker does (use_learner_device): act with a CPU copy, given
    the learner's weights and version before each sample()."""
    workers = WorkerSet(env="CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=8, seed=0)
    worker = workers.local_worker
    worker._acting = copy.deepcopy(worker.policy)
    with torch.no_grad():
        for p in worker.policy.model.parameters():
            p.add_(0.5)
    worker.policy.weights_version = 7
    batch = worker.sample()
    learner, acting = worker.policy.model.state_dict(), worker._acting.model.state_dict()
    assert all(torch.equal(learner[k], acting[k]) for k in learner)
    assert set(batch["weights_version"]) == {7}
    logp = worker._acting.compute_actions(batch["obs"]).logp  # the copy's weights are the ones used
    assert logp.shape == (16,)


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """Saved with its storages tagged cuda:0 (as torch.save writes a GPU tensor), it reads back
    here on the CPU, with weights_only."""
    path = tmp_path / "model.pt"
    state = {"weight": torch.arange(6.0).reshape(2, 3)}
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)
    if NO_CUDA:
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # the file does claim a GPU
    loaded = _load_tensors(path)
    assert loaded["weight"].device.type == "cpu" and torch.equal(loaded["weight"], state["weight"])


# ---- threads ------------------------------------------------------------------------------------
def test_the_learner_computes_with_its_threads_and_the_acting_worker_keeps_one():
    workers = WorkerSet(env="CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=16, seed=0,
                        learner_num_threads=2)
    assert torch.get_num_threads() == 1  # the driver's rollout worker acts on one thread
    seen = []

    def loss(policy, batch):
        seen.append(torch.get_num_threads())
        return policy.model(batch["obs"])[1].pow(2).mean(), {}

    batches = Stream.source(lambda: iter(workers.local_worker.sample, None))
    with Plan(batches.then(TrainOneStep(workers, loss, num_sgd_iter=2, sgd_minibatch_size=16))) as plan:
        plan.step()
    assert seen == [2, 2, 2, 2]  # 2 epochs x 2 minibatches
    assert torch.get_num_threads() == 1
    with learner_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("num_workers, cpus, cores, threads", [(0, 1.0, 16, 15), (0, 1.0, 2, 1), (2, 1.0, 2, 1),
                                                               (4, 0.5, 16, 13), (8, 1.0, 8, 1)])
def test_the_learner_takes_the_cores_the_workers_and_acting_leave(num_workers, cpus, cores, threads):
    assert default_learner_threads(num_workers, cpus, cores) == threads


def test_a_learner_that_takes_turns_with_the_driver_s_acting_takes_every_core(monkeypatch):
    assert default_learner_threads(0, 1.0, 2, acting_in_turn=True) == 2
    assert default_learner_threads(0, 1.0, 16, acting_in_turn=True) == 16
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # Ray sets it to an actor's num_cpus
    assert default_learner_threads(0, 1.0, acting_in_turn=True) == 3
    assert default_learner_threads(1, 1.0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert default_learner_threads(0, 1.0, acting_in_turn=True) == len(os.sched_getaffinity(0))


def test_the_local_worker_learns_on_every_core_unless_remote_workers_or_clients_share_them():
    assert WorkerSet(env="CartPole-v1", seed=0).learner_num_threads == default_learner_threads(0, 1.0, acting_in_turn=True)
    assert WorkerSet(env="CartPole-v1", seed=0, learner_num_threads=1).learner_num_threads == 1


# ---- the Nature CNN -----------------------------------------------------------------------------
# Worked out by hand (84x84x4 uint8, Mnih et al. 2015): conv 4->32 8x8/4: 4*32*64 + 32 = 8,224
# (84 -> 20); conv 32->64 4x4/2: 32*64*16 + 64 = 32,832 (20 -> 9); conv 64->64 3x3/1:
# 64*64*9 + 64 = 36,928 (9 -> 7); linear 7*7*64 = 3,136 -> 512: 3,136*512 + 512 = 1,606,144.
NATURE_TORSO = 8_224 + 32_832 + 36_928 + 1_606_144   # 1,684,128


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("shape", [(84, 84, 4), (4, 84, 84)])
def test_atari_frames_get_the_nature_cnn_in_both_layouts(shape):
    space = gym.spaces.Box(0, 255, shape, np.uint8)
    policy = TorchPolicy(space, gym.spaces.Discrete(4), seed=0)
    assert isinstance(policy.model.encoder, NatureCNN) and count(policy.model.encoder) == NATURE_TORSO
    # Linear heads on the 512 features: policy 512*4 + 4, value 512 + 1.
    assert count(policy.model) == NATURE_TORSO + 2_052 + 513
    q = QNetwork(space, gym.spaces.Discrete(4), 4, {})   # dueling: advantage 512*4 + 4, value 513
    assert isinstance(q.encoder, NatureCNN) and count(q) == NATURE_TORSO + 2_052 + 513
    assert policy.compute_actions(np.zeros((2, *shape), np.uint8)).actions.shape == (2,)


def test_uint8_pixels_are_scaled_by_1_over_255_inside_the_model():
    space = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    encoder = TorchPolicy(space, gym.spaces.Discrete(4), seed=0).model.encoder
    pixels = torch.randint(0, 256, (2, 84, 84, 4), dtype=torch.uint8)
    by_hand = encoder.out(encoder.net(pixels.permute(0, 3, 1, 2).float() / 255.0))
    assert torch.allclose(encoder(pixels), by_hand)
