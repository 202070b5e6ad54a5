"""flowrl.operators: the operator library plans are built from."""

from flowrl.operators.concurrency import Concurrently, Dequeue, Enqueue, LearnerQueue
from flowrl.operators.metrics import StandardMetricsReporting
from flowrl.operators.replay import MixInReplay, Replay, ReplayBuffer, StoreToReplayBuffer
from flowrl.operators.rollouts import (ComputeAdvantages, ConcatBatches, Gather, ParallelRollouts, RecordSampled,
                                       SelectExperiences, StandardizeFields, trajectory_ends)
from flowrl.operators.train import (AverageGradients, ApplyGradients, ComputeGradients, Gradients, TrainOneStep,
                                    UpdateTargetNetwork, UpdateWeights)

__all__ = [
    "ApplyGradients", "AverageGradients", "ComputeAdvantages", "ComputeGradients", "ConcatBatches", "Concurrently",
    "Dequeue", "Enqueue", "Gather", "Gradients", "LearnerQueue", "MixInReplay", "ParallelRollouts", "RecordSampled",
    "Replay", "ReplayBuffer", "SelectExperiences", "StandardMetricsReporting", "StandardizeFields",
    "StoreToReplayBuffer", "TrainOneStep", "UpdateTargetNetwork", "UpdateWeights", "trajectory_ends",
]
