"""flowrl.connectors: write sampled experience to datasets, and read datasets back as streams
of SampleBatches (Parquet, Arrow IPC, RLlib JSON, Minari)."""

from flowrl.connectors.input import Dataset, DatasetError, resolve_files, shuffled
from flowrl.connectors.multi_agent import MultiAgentDatasetWriter, open_policy
from flowrl.connectors.output import OUTPUT_COLUMNS, DatasetWriter

__all__ = ["Dataset", "DatasetError", "DatasetWriter", "MultiAgentDatasetWriter", "OUTPUT_COLUMNS", "open_policy",
           "resolve_files", "shuffled"]
