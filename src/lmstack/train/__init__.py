"""The training stage: the loop, objectives, optimizers and schedules, checkpoints, distributed training."""
