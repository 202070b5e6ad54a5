"""flowrl: reinforcement learning as a dataflow program over Arrow SampleBatches."""

from flowrl.executors import (ActorDiedError, ActorRestartLimitError, ActorSet, LocalExecutor, RayExecutor,
                              from_actors, gather_sync, make_executor)
from flowrl.plan import Counters, Plan, PlanContext
from flowrl.sample_batch import SampleBatch
from flowrl.stream import (Filter, FlatMap, Map, Operator, OperatorError, Order, PlanStructureError, Stream,
                           union, zip_streams)

__version__ = "0.1.0"

__all__ = [
    "ActorDiedError", "ActorRestartLimitError", "ActorSet", "Counters", "Filter", "FlatMap", "LocalExecutor",
    "Map", "Operator", "OperatorError", "Order", "Plan", "PlanContext", "PlanStructureError", "RayExecutor",
    "SampleBatch", "Stream", "from_actors", "gather_sync", "make_executor", "union", "zip_streams",
    "__version__",
]
