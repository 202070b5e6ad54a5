"""flowrl.connectors: write sampled experience to datasets, and read datasets back as streams
of SampleBatches (Parquet, Arrow IPC, RLlib JSON, Minari)."""

from flowrl.connectors.input import Dataset, DatasetError, resolve_files, shuffled
from flowrl.connectors.output import OUTPUT_COLUMNS, DatasetWriter

__all__ = ["Dataset", "DatasetError", "DatasetWriter", "OUTPUT_COLUMNS", "resolve_files", "shuffled"]
