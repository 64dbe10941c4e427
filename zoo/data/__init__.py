"""zoo.data: one webdataset loader for every method and eval, shard tools, built-in datasets.

    from zoo.data import loader
    batches = loader("shards/train-{00000..00015}.tar", fields=("image", "label"), transform=..., batch_size=64)
"""

from zoo.data.pipeline import Loader, loader
from zoo.data.reader import check_shards, dataset_size
from zoo.data.writer import write_shards
from zoo.errors import DataError

__all__ = ["loader", "Loader", "DataError", "dataset_size", "write_shards", "check_shards"]
