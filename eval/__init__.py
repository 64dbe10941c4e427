"""zoo.eval: evaluation of frozen backbones (kNN, linear probe, zero-shot, retrieval, dense)."""
