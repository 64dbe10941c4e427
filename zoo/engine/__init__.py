"""zoo.engine: the one training loop every recipe runs in (optim, schedules, checkpoints, logging)."""
