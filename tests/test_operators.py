"""Operator tests, each on both executors (the `executor` fixture)."""

import numpy as np
import pytest
import torch

from flowrl import Plan, Stream, make_executor
from flowrl.operators import (ComputeAdvantages, ConcatBatches, Concurrently, Dequeue, Enqueue, Gather,
                              LearnerQueue, MixInReplay, ParallelRollouts, BatchReplayBuffer, StandardizeFields,
                              StandardMetricsReporting, TrainOneStep, UpdateTargetNetwork, UpdateWeights)
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.stream import Order
from flowrl.testing import flowrl_threads, same_experience, wait_until



def workers(n=2, **kwargs):
    cfg = dict(env="CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=10, seed=0)
    cfg.update(kwargs)
    return WorkerSet(num_workers=n, num_cpus_per_worker=0.1, **cfg)


def vf_loss(policy, b):
    loss = ((policy.model(b["obs"])[1] - b["value_targets"]) ** 2).mean()
    return loss, {"vf_loss": loss}


def test_sync_rollouts_gather_every_worker(executor):
    ws = workers(2)
    with Plan(ParallelRollouts(ws), executor=executor) as plan:
        r = plan.step()
    batch = r["output"]
    assert len(batch) == 2 * 2 * 10 and r["num_env_steps_sampled"] == 40
    ids = batch["eps_id"].tolist()  # worker 1's 20 rows, then worker 2's: disjoint episode ids
    assert not set(ids[:20]) & set(ids[20:])


def test_async_rollouts_yield_one_worker_batch_at_a_time(executor):
    ws = workers(2)
    with Plan(ParallelRollouts(ws, Gather.ASYNC), executor=executor) as plan:
        results = [plan.step() for _ in range(4)]
    assert all(len(r["output"]) == 20 for r in results)
    assert results[-1]["num_env_steps_sampled"] == 80


def test_sync_and_local_rollouts_agree_across_executors():
    def first_batch(kind):
        ex = make_executor(kind)
        with Plan(ParallelRollouts(workers(2)), executor=ex) as plan:
            return plan.step()["output"]

    assert same_experience(first_batch("local"), first_batch("ray"))


def test_update_weights_reaches_workers_and_batches_carry_the_version(executor):
    ws = workers(2)
    stream = ParallelRollouts(ws).then(ComputeAdvantages()).then(TrainOneStep(ws, vf_loss)).then(UpdateWeights(ws))
    sampled = ParallelRollouts(ws)
    with Plan(stream, executor=executor) as plan:
        r1, r2 = plan.step(), plan.step()
        assert (r1["weights_version"], r2["weights_version"]) == (1, 2)
        assert ws.remote_workers.foreach("weights_version") == [2, 2]
        obs = np.zeros((1, 4), np.float32)
        remote_value = ws.remote_workers.foreach("get_weights")[0]
        for k, v in ws.policy.get_weights().items():
            torch.testing.assert_close(remote_value[k], v)
    del sampled


def test_replaced_worker_gets_current_weights(executor):
    ws = workers(1)
    stream = ParallelRollouts(ws).then(ComputeAdvantages()).then(TrainOneStep(ws, vf_loss)).then(UpdateWeights(ws))
    with Plan(stream, executor=executor) as plan:
        plan.step()
        ws.remote_workers.kill(0)
        r = plan.step()
        assert r["num_actor_restarts"] == 1
        assert ws.remote_workers.foreach("weights_version") == [2]


def test_train_one_step_lowers_the_loss_and_counts_trained_steps(executor):
    ws = workers(0)
    batches = Stream.from_iterable([ws.local_worker.sample()] * 30).then(ComputeAdvantages())
    with Plan(batches.then(TrainOneStep(ws, vf_loss, num_sgd_iter=2, sgd_minibatch_size=5)), executor=executor) as p:
        results = [p.step() for _ in range(30)]
    assert results[-1]["vf_loss"] < results[0]["vf_loss"]
    assert results[-1]["num_env_steps_trained"] == 30 * 20


def test_learner_thread_through_a_bounded_queue(executor):
    ws = workers(2)
    q = LearnerQueue(maxsize=2)
    sample = ParallelRollouts(ws, Gather.ASYNC).then(ComputeAdvantages()).then(Enqueue(q))
    learn = Dequeue(q).then(TrainOneStep(ws, vf_loss)).through_thread(maxsize=1, name="learner")
    plan_stream = Concurrently({"sample": sample, "train": learn}, output="train", order=Order.AS_READY)
    with Plan(plan_stream, executor=executor, report=StandardMetricsReporting()) as plan:
        results = [plan.step() for _ in range(5)]
    assert all("vf_loss" in r for r in results)
    assert results[-1]["num_env_steps_trained"] >= 5 * 20
    assert results[-1]["num_env_steps_sampled"] - results[-1]["num_env_steps_trained"] <= (2 * 2 + 2 + 2) * 20
    # The learner thread waits on an empty queue once sampling stops; closing the plan ends it.
    assert wait_until(lambda: not flowrl_threads(), 5), flowrl_threads()


def test_concat_standardize_and_metrics(executor):
    ws = workers(2)
    stream = (ParallelRollouts(ws, Gather.ASYNC).then(ConcatBatches(min_batch_size=50)).then(ComputeAdvantages())
              .then(StandardizeFields(["advantages"])))
    with Plan(stream, executor=executor, report=StandardMetricsReporting(), min_env_steps=400) as plan:
        r = plan.step()
    assert r["num_env_steps_sampled"] >= 400 and r["timesteps_total"] == r["num_env_steps_sampled"]
    assert r["episode_return_mean"] is not None and r["episode_len_mean"] > 0
    assert r["env_steps_per_s"] > 0


def test_mix_in_replay_and_target_network(executor):
    ws = workers(0)
    buf = BatchReplayBuffer(capacity=3)
    stream = (ParallelRollouts(ws).then(MixInReplay(buf, replay_proportion=1.0)).then(ComputeAdvantages())
              .then(TrainOneStep(ws, vf_loss)).then(UpdateTargetNetwork(ws, every_steps=40)))
    with Plan(stream, executor=executor) as plan:
        results = [plan.step() for _ in range(4)]
    assert len(buf) == 2
    assert results[-1]["num_env_steps_trained"] == 4 * 20
    assert results[-1]["num_target_updates"] == 2


def test_averaged_microbatch_gradients_equal_the_full_batch_gradient(executor):
    from flowrl.operators import AverageGradients, ComputeGradients

    ws = workers(0)
    batch = ComputeAdvantages()(ws.local_worker.sample())  # 20 rows

    def mean_loss(policy, b):
        return ((policy.model(b["obs"])[1] - b["value_targets"]) ** 2).mean(), {}

    full = ComputeGradients(ws, mean_loss)(batch)
    micro = Stream.from_iterable([batch[0:8], batch[8:16], batch[16:20]]).then(ComputeGradients(ws, mean_loss))
    with Plan(micro.then(AverageGradients(3)), executor=executor) as plan:
        averaged = plan.step()["output"]
    assert averaged.num_rows == 20
    for a, b in zip(averaged.grads, full.grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
