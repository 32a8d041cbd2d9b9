"""Scale-out pieces behind lmstack.train.distributed: process setup, DDP, FSDP2, ZeRO-1, tensor parallel,
gathered checkpoints, gradient norms and per-rank memory accounting. Import from lmstack.train.distributed."""
