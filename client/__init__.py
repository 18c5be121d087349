"""An institution's side: local (DP-)training of the LoRA adapter on private data."""
