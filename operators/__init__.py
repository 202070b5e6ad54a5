"""flowrl.operators: the operator library plans are built from."""

from flowrl.operators.concurrency import Concurrently, Dequeue, Enqueue, LearnerQueue
from flowrl.operators.metrics import StandardMetricsReporting
from flowrl.operators.replay import (BatchReplayBuffer, MixInReplay, Replay, ReplayBuffer, StoreToReplayBuffer,
                                     UpdatePriorities, check_replay_memory, weights_for_training_intensity)
from flowrl.operators.rollouts import (ComputeAdvantages, ConcatBatches, Gather, ParallelRollouts, RecordSampled,
                                       SelectExperiences, SelectPolicies, StandardizeFields, trajectory_ends)
from flowrl.operators.train import (AverageGradients, ApplyGradients, ComputeGradients, Gradients,
                                    LearningRateSchedule, TrainOneStep, UpdateTargetNetwork, UpdateWeights,
                                    trained_rows)

__all__ = [
    "ApplyGradients", "AverageGradients", "BatchReplayBuffer", "ComputeAdvantages", "ComputeGradients",
    "ConcatBatches", "Concurrently", "Dequeue", "Enqueue", "Gather", "Gradients", "LearnerQueue",
    "LearningRateSchedule", "MixInReplay", "ParallelRollouts", "RecordSampled", "Replay", "ReplayBuffer",
    "SelectExperiences", "SelectPolicies", "StandardMetricsReporting", "StandardizeFields", "StoreToReplayBuffer", "TrainOneStep",
    "UpdatePriorities", "UpdateTargetNetwork", "UpdateWeights", "check_replay_memory", "trained_rows",
    "trajectory_ends", "weights_for_training_intensity",
]
