"""Training (LLaVA Sec. 4.2): what each stage trains and its loss (stages.py), the loop (trainer.py), its
resumable snapshots (snapshots.py), where it runs (devices.py) and the recipes by name (recipes.py)."""
