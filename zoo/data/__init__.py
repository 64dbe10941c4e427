"""zoo.data: one webdataset loader for every method and eval, shard tools, built-in datasets."""
