"""Loss curves drawn with Pillow (no plotting library needed): one panel per training stage."""
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

W, H, PAD = 420, 260, 40


def read_losses(metrics_file) -> list:
    """The logged losses; a torn last line (a crash mid-write) is left out, as the trainer does, and so is
    a step with nothing to learn (loss null)."""
    losses = []
    for line in Path(metrics_file).read_text().splitlines():
        try:
            losses.append(float(json.loads(line)["loss"]))
        except (ValueError, KeyError, TypeError):
            continue
    return losses


def smooth(values: list, window: int) -> list:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw_panel(draw: ImageDraw.ImageDraw, x0: int, title: str, losses: list) -> None:
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1
    left, top, right, bottom = x0 + PAD, PAD, x0 + W - 10, H - PAD
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    draw.text((left, 12), f"{title}: loss {losses[0]:.2f} -> {losses[-1]:.2f}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), f"step 1 .. {len(losses)}", fill=(80, 80, 80))
    draw.text((x0 + 2, top), f"{hi:.2f}", fill=(80, 80, 80))
    draw.text((x0 + 2, bottom - 10), f"{lo:.2f}", fill=(80, 80, 80))

    def point(i, v):
        return (left + (right - left) * i / max(1, len(losses) - 1), bottom - (bottom - top) * (v - lo) / (hi - lo))
    draw.line([point(i, v) for i, v in enumerate(losses)], fill=(190, 200, 230), width=1)
    window = max(1, int(math.sqrt(len(losses))))
    draw.line([point(i, v) for i, v in enumerate(smooth(losses, window))], fill=(30, 70, 180), width=2)


def plot_losses(metrics_files: dict, out_path) -> None:
    """{panel title: metrics.jsonl} -> a PNG with one loss curve per panel (raw and smoothed)."""
    panels = [(title, read_losses(f)) for title, f in metrics_files.items()]
    panels = [(t, v) for t, v in panels if v]
    if not panels:
        return
    image = Image.new("RGB", (W * len(panels), H), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, losses) in enumerate(panels):
        draw_panel(draw, i * W, title, losses)
    image.save(out_path)
