"""flowrl: reinforcement learning as a dataflow program over Arrow SampleBatches."""

from flowrl.executors import (ActorDiedError, ActorRestartLimitError, ActorSet, LocalExecutor, RayExecutor,
                              from_actors, gather_sync, make_executor)
from flowrl.plan import Counters, Plan, PlanContext
from flowrl.sample_batch import SampleBatch
from flowrl.stream import (Filter, FlatMap, Map, Operator, OperatorError, Order, PlanStructureError, Stream,
                           union, zip_streams)

__version__ = "0.1.0"


from flowrl.config import ConfigError
from flowrl.planfile import ExperimentError

# The Python API and flowrl.load_policy, as the README shows them; imported on first use (they
# bring in torch), as is flowrl.tune (Ray Tune).
_LAZY = {"load_policy": "flowrl.trained", "Algorithm": "flowrl.algorithm", "build": "flowrl.algorithm",
         "restore": "flowrl.algorithm", "train": "flowrl.algorithm"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "tune":
        return importlib.import_module("flowrl.tune")
    raise AttributeError(f"module 'flowrl' has no attribute {name!r}")

__all__ = [
    "ActorDiedError", "ActorRestartLimitError", "ActorSet", "Counters", "Filter", "FlatMap", "LocalExecutor",
    "Map", "Operator", "OperatorError", "Order", "Plan", "PlanContext", "PlanStructureError", "RayExecutor",
    "SampleBatch", "Stream", "from_actors", "gather_sync", "make_executor", "union", "zip_streams",
    "__version__", "load_policy", "Algorithm", "ConfigError", "ExperimentError", "build", "restore", "train",
]
