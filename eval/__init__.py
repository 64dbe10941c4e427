"""zoo.eval: evaluation of frozen backbones (kNN, linear probe, zero-shot, retrieval, dense) and of generators
(diffusion sampling with T-Stitch, Fréchet distance, label accuracy)."""
