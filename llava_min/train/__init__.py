"""Training (LLaVA Sec. 4.2): what each stage trains and its loss (stages.py), each stage's resolved settings
(settings.py), the loop (trainer.py), its resumable snapshots (snapshots.py), where it runs (devices.py), the
FLOPs it counts (flops.py) and the recipes by name (recipes.py)."""
