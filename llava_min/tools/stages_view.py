"""Sec. 4.2's two stages side by side, read from a finished run: what trains, on what, and how it went.

    python -m llava_min.tools.inspect stages --run runs/toy/full [--data-dir data/toy]

Stage 1 (feature alignment) trains W alone on image-caption pairs; stage 2 (end-to-end fine-tuning)
trains W and the LLM on instructions. What trains comes from `STAGE_PARTS`, the settings from each
stage's checkpoint and metrics.jsonl. With --data-dir, a run that trained the projector in whitened
coordinates (toy/whiten.py) also shows why: the spread of CLIP's features over directions.
"""
import json
from pathlib import Path

from ..files import InputError, read_json

PLAIN = "plain"  # stage 1's template: the image, then the caption (the official preprocess_plain)


def add_parser(sub) -> None:
    p = sub.add_parser("stages", help="stage 1 vs stage 2: what trains, template, crop / pad, lr, loss")
    p.add_argument("--run", type=Path, required=True, help="a run directory holding stage1/ and stage2/")
    p.add_argument("--data-dir", type=Path, help="its toy world: also show the features the projector reads")
    p.add_argument("--images", type=int, default=256, help="training images for the feature statistics")
    p.set_defaults(show=run)


def metrics(stage_dir: Path) -> dict:
    """Steps, the peak learning rate and the loss at the start and the end (means of 10 steps) of a stage."""
    log = stage_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"steps": len(rows), "lr": max((r["lr"] for r in rows), default=float("nan")),
            "first": mean(losses[:10]), "last": mean(losses[-10:])}


def trained(model, stage: str) -> tuple:
    """(trained parts, frozen parts, trained parameter count) as `freeze_for_stage` sets them."""
    from ..train.stages import STAGE_PARTS, freeze_for_stage
    groups = freeze_for_stage(model, stage, 1.0)
    parts = STAGE_PARTS[stage]
    return ([p for p, t in parts.items() if t], [p for p, t in parts.items() if not t],
            sum(p.numel() for g in groups for p in g["params"]))


def table(run_dir: Path) -> list:
    import torch

    from ..checkpoint.configs import read_config
    from ..checkpoint.official import official_aspect
    from ..checkpoint.peft import load_model
    dirs = {s: run_dir / f"stage{s}" for s in ("1", "2")}
    for d in dirs.values():
        read_config(d)  # (a missing or unfinished stage is named)
    model = load_model(dirs["2"], dtype=torch.float32)
    rows = {"": ["stage 1: feature alignment", "stage 2: end-to-end fine-tuning"],
            "data": ["image-caption pairs", "instructions (Sec. 3, VQA)"]}
    for s in ("1", "2"):
        on, off, n = trained(model, s)
        m = metrics(dirs[s])
        rows.setdefault("trains", []).append(", ".join(on))
        rows.setdefault("frozen", []).append(", ".join(off))
        rows.setdefault("trained parameters", []).append(f"{n:,}")
        rows.setdefault("peak lr", []).append(f"{m['lr']:g}")
        rows.setdefault("optimizer steps", []).append(str(m["steps"]))
        rows.setdefault("loss, first -> last", []).append(f"{m['first']:.3f} -> {m['last']:.3f} (10-step means)")
    rows["template"] = [PLAIN, model.cfg.template]
    rows["image"] = [official_aspect(read_config(dirs["1"]).get("image_aspect_ratio", "pad")),
                     model.cfg.image_aspect_ratio]
    width = max(len(k) for k in rows) + 2
    return [f"{k:<{width}}{a:<34}{b}" for k, (a, b) in rows.items()], model


def spread(model, data_dir: Path, n: int) -> list:
    """How CLIP's patch features spread over directions, on the first `n` stage-1 images."""
    import torch

    from ..data.image import load_image, preprocess
    records = [r for r in read_json(data_dir / "pretrain.json") if r.get("image")][:n]
    if not records:
        raise InputError(f"{data_dir / 'pretrain.json'} has no images")
    size = model.cfg.vision.image_size
    pixels = torch.stack([preprocess(load_image(r["image"], data_dir / "images"), size, "crop") for r in records])
    with torch.no_grad():
        z = model.vision_tower(pixels).flatten(0, 1).double()
    e = torch.linalg.eigvalsh(torch.cov(z.T)).flip(0).clamp_min(0)
    share = e / e.sum()
    return [f"CLIP's patch features on {len(records)} stage-1 images ({len(z)} vectors of {z.shape[1]}): the largest "
            f"direction holds {share[0]:.0%} of the variance, the top 5 {share[:5].sum():.0%}, the smallest "
            f"{e[-1] / e[0]:.1e} of the largest;",
            "so the run trained the projector's first layer as W1' A (x - mu), A = C^(-1/2) of such features "
            "(whitened coordinates), and saved W1 = W1' A."]


def stage1_config(path: Path, raw: dict):
    """A stage-1 directory (ours, or an official projector release) as the labels view reads it: trained on
    `plain`, one image token per CLIP patch, the image token it was trained with (official: -200)."""
    from ..checkpoint.configs import clip_vision_config
    from ..checkpoint.official import resolve_vision_path
    from ..model.llava import LlavaConfig
    token = raw.get("image_token_index", -200)
    return LlavaConfig(vision=clip_vision_config(resolve_vision_path(raw, path, None)),
                       select_feature=raw.get("mm_vision_select_feature", "patch"), template=PLAIN,
                       image_token_id=token if token >= 0 else -200)


def run(args) -> None:
    lines, model = table(args.run)
    print("\n".join(lines))
    settings = args.run / "settings.json"
    whitened = settings.is_file() and read_json(settings).get("whiten_features")
    if args.data_dir is not None and whitened:
        print("\n".join(spread(model, args.data_dir, args.images)))
