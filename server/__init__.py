"""The federation's side: aggregation of LoRA A/B only, checkpoints of every round, run records."""
