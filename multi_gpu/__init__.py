"""Training on several GPUs under torchrun: distributed.py (DDP, FSDP2, sharded checkpoints)."""
