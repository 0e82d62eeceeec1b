"""Checkpoint formats: the format plumbing a reader of the method may skip. Every layout's key names, read both
ways (names.py); files in and out strictly (weights.py), config.json (configs.py), the layouts read (load.py,
official.py; LoRA adapters in peft's layout: peft.py) and written (save.py)."""
