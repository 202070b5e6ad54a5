"""flowrl: reinforcement learning as a dataflow program over Arrow SampleBatches."""

from flowrl.sample_batch import SampleBatch

__version__ = "0.1.0"

__all__ = ["SampleBatch", "__version__"]
