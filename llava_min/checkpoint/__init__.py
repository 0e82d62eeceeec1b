"""Checkpoint formats: the format plumbing a reader of the method may skip. Files in and out strictly
(weights.py), config.json (configs.py), the layouts read (load.py, official.py) and written (save.py),
LoRA adapters in peft's layout (peft.py)."""
