"""The toy pipeline behind `python train.py`: the whole method, from data to scores, on a laptop.

synthetic world (gen_data) -> tokenizer -> clip -> lm -> stage 1 -> stage 2 -> held-out evaluation.
Each step is skipped when its output exists, so a rerun resumes where the last one stopped. The
pretrained parts (data, tokenizer, clip, lm) are shared by every ablation; stage 1 and stage 2 live
in one directory per variant (runs/toy/full, runs/toy/linear, ...). `--world detail` builds the
AnyRes variant of the world under data/toy-detail and runs/toy-detail (variants full and anyres).
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ..train.devices import use_bf16
from ..checkpoint.save import finished_checkpoint as finished
from ..files import atomic_write, same_settings, write_json
from .build import build_world

ABLATIONS = {  # variant -> the train.py flags that make it (the rows of the README's table)
    "full": [],
    "no-stage2": ["--no-stage2"],
    "no-stage1": ["--no-stage1"],
    "linear": ["--projector", "linear"],
    "last-layer": ["--select-layer", "-1"],
    "half-data": ["--data-fraction", "0.5"],
    "no-whiten": ["--no-whiten-features"],
}
# Per-world epochs, where they differ from the preset's (train.py's --epochs overrides them): the detail world's
# one-pixel patterns need longer in the CLIP and in both stages (docs/anyres.md).
WORLD_EPOCHS = {"detail": {"clip": 6.0, "stage 1": 2.0, "stage 2": 2.0}}


def variant_name(args) -> str:
    parts = [name for name, on in [("no-stage1", args.no_stage1), ("no-stage2", args.no_stage2),
                                   ("linear", args.projector == "linear"), ("last-layer", args.select_layer == -1),
                                   ("half-data", args.data_fraction == 0.5), ("anyres", args.anyres),
                                   ("no-whiten", args.whiten_features is False)] if on]
    if args.data_fraction not in (0.5, 1.0):
        parts.append(f"data-{args.data_fraction:g}")
    return "-".join(parts) or "full"


# What the toy pipeline's outputs depend on, at each level: the world (data dir), the shared models (out),
# and each variant's stages 1 and 2 (out/variant). Everything else on the command line says where files go,
# how fast, or what to do with them.
WORLD_KEYS = ("preset", "seed", "world", "num_images", "num_eval")
VARIANT_KEYS = ("no_stage1", "no_stage2", "projector", "select_layer", "data_fraction", "anyres", "whiten_features",
                "lora", "lora_r", "lora_alpha", "lora_dropout", "template", "max_length", "projector_lr",
                "group_by_length", "grad_checkpointing")
NOT_SHAPING = ("stage", "out", "data_dir", "data", "image_folder", "tokenizer", "init", "vision", "llm", "resume",
               "save_every", "stop_after", "num_workers", "device", "bf16", "no_progress", "ablations", "fsdp",
               "on_error", "overwrite")


def resolved(args, preset) -> dict:
    """The command line's shaping settings, with the preset's value where a flag was not given (so that
    passing a default explicitly is the same run)."""
    given = {k: v for k, v in vars(args).items() if k not in NOT_SHAPING}
    pick = lambda value, default: default if value is None else value  # noqa: E731
    given.update(num_images=args.num_images or preset.num_images, num_eval=args.num_eval or preset.num_eval,
                 whiten_features=pick(args.whiten_features, preset.whiten_features),
                 group_by_length=pick(args.group_by_length, preset.group_by_length),
                 projector=args.projector or preset.projector, select_layer=pick(args.select_layer, preset.select_layer),
                 template=args.template or preset.template, max_length=args.max_length or preset.max_length)
    return given


def check_settings(args, preset, data: Path, root: Path, run_dir: Path) -> None:
    given = resolved(args, preset)
    same_settings(data / "world.json", {k: given[k] for k in WORLD_KEYS}, f"the world in {data} was")
    same_settings(root / "settings.json", {k: v for k, v in given.items() if k not in VARIANT_KEYS},
                  f"the models in {root} were")
    same_settings(run_dir / "settings.json", {k: given[k] for k in VARIANT_KEYS}, f"the variant in {run_dir} was")


def step(name: str, done: bool, fn, timings: dict, where: Path) -> None:
    """Runs `fn` unless its output exists; `timings` holds each step's seconds. A step's time is recorded as
    soon as it ends in `where`/seconds.json, beside its output, so a skipped step keeps the time it took."""
    if done:
        took = f" (it took {timings[name]:.0f}s when it ran)" if name in timings else ""
        print(f"[{name}] output exists, skipped{took}")
        return
    print(f"[{name}] ...", flush=True)
    t0 = time.perf_counter()
    fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    write_json(where / "seconds.json", {**recorded_seconds(where), name: timings[name]})
    print(f"[{name}] done in {timings[name]:.0f}s", flush=True)


def recorded_seconds(where: Path) -> dict:
    """The step times recorded in `where` (none if no step there has finished)."""
    try:
        return dict(json.loads((where / "seconds.json").read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def stage_args(args, name: str, **fields) -> argparse.Namespace:
    """One stage's arguments: the command line's, with the world's epochs for the stage unless --epochs is given."""
    epochs = args.epochs or WORLD_EPOCHS.get(args.world, {}).get(name)
    return argparse.Namespace(**{**vars(args), "epochs": epochs, **fields})


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def earlier_timings(results_file: Path) -> dict:
    """The step times an earlier run of this variant recorded (none if it has not finished one)."""
    try:
        return dict(json.loads(results_file.read_text())["stage_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_pipeline(args, preset, stages) -> dict:
    data, root = args.data_dir, args.out
    images, tokenizer = data / "images", root / "tokenizer.model"
    run_dir = root / variant_name(args)
    check_settings(args, preset, data, root, run_dir)
    timings = {**earlier_timings(run_dir / "results.json"), **recorded_seconds(data), **recorded_seconds(root),
               **recorded_seconds(run_dir)}
    num_images, num_eval = args.num_images or preset.num_images, args.num_eval or preset.num_eval
    step("data", (data / "eval.json").is_file(),
         lambda: build_world(data, num_images, num_eval, args.seed, image_size=preset.vision.image_size,
                                     progress=not args.no_progress, world=args.world),
         timings, data)
    common = dict(tokenizer=tokenizer, image_folder=images, init=None)

    def train(name: str, key: str, **fields):
        def run():
            torch.manual_seed(args.seed)  # fresh weights depend on the seed, not on which stages ran before
            interrupted = (Path(fields["out"]) / "resume" / "state.pt").is_file()  # (--save-every N wrote it)
            return stages[key](stage_args(args, name, **{**common, "stage": key, "resume": interrupted, **fields}),
                               preset)
        return run

    step("tokenizer", tokenizer.is_file(), train("tokenizer", "tokenizer", data=data / "corpus.txt", out=tokenizer),
         timings, root)

    clip, lm = root / "clip", root / "lm"
    step("clip", finished(clip), train("clip", "clip", data=data / "pretrain.json", out=clip), timings, root)
    step("lm", finished(lm), train("lm", "lm", data=data / "corpus.txt", out=lm), timings, root)
    parts = dict(vision=clip, llm=lm)
    stage1, stage2 = run_dir / "stage1", run_dir / "stage2"
    if not args.no_stage1:
        step("stage 1", finished(stage1), train("stage 1", "1", **parts, data=data / "pretrain.json", out=stage1),
             timings, run_dir)
    if not args.no_stage2:
        step("stage 2", finished(stage2), train("stage 2", "2", **parts, init=None if args.no_stage1 else stage1,
                                                 data=data / "instruct.json", out=stage2), timings, run_dir)
    final = stage1 if args.no_stage2 else stage2
    t0 = time.perf_counter()
    results = evaluate_run(final, data, args)
    took = round(time.perf_counter() - t0, 1)  # the whole: each step's time when it ran, and this evaluation
    results.update(variant=variant_name(args), world=args.world, seed=args.seed, device=device_name(args.device),
                   precision="bf16 autocast" if use_bf16(args.device, args.bf16) else "fp32",
                   stage_seconds=timings, eval_seconds=took, wall_seconds=round(sum(timings.values()) + took, 1),
                   num_train_images=len(json.loads((data / "pretrain.json").read_text())))
    atomic_write(run_dir / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    report(results)
    from ..tools.plot import plot_losses
    curves = {name: d / "metrics.jsonl" for name, d in [("stage 1", stage1), ("stage 2", stage2)]}
    plot_losses({k: v for k, v in curves.items() if v.is_file()}, run_dir / "loss.png")
    print(f"\nmodels: {', '.join(str(d) for d in (stage1, stage2) if finished(d))}; results: "
          f"{run_dir / 'results.json'}; loss curves: {run_dir / 'loss.png'}")
    return results


def evaluate_run(model_dir: Path, data: Path, args) -> dict:
    from ..checkpoint.peft import load_model
    from ..eval.score import evaluate
    from ..tokenizer import Tokenizer
    model = load_model(model_dir, dtype=torch.float32, device=args.device)  # (a LoRA stage 2: on its stage 1)
    tok = Tokenizer(model_dir / "tokenizer.model")
    seen = evaluate(model, tok, data / "eval.json", data / "images", progress=not args.no_progress)
    blind = evaluate(model, tok, data / "eval.json", data / "images", blind=True, progress=not args.no_progress)
    samples = [p for p in seen["predictions"] if not p["id"].endswith("-choice")][:6]
    return {"model": str(model_dir), "scores": seen["scores"], "blind_scores": blind["scores"], "samples": samples}


def report(results: dict) -> None:
    print(f"\nheld-out results ({results['world']} world, {results['variant']}, {results['device']}, "
          f"{results['precision']}, {results['wall_seconds']:.0f}s)")
    print(f"{'question type':<14}{'accuracy':>10}{'blind':>10}{'n':>6}")
    for fmt, kinds in results["scores"].items():
        for kind, s in kinds.items():
            blind = results["blind_scores"].get(fmt, {}).get(kind, {}).get("accuracy", float("nan"))
            label = f"{fmt}:{kind}" if fmt != "short" else kind
            print(f"{label:<14}{s['accuracy']:>10.1f}{blind:>10.1f}{s['n']:>6}")
    print("\nsample answers (prediction | truth):")
    for s in results["samples"]:
        print(f"  {s['id']}: {s['prediction']!r} | {s['answer']!r}")


def run_ablations(args, preset, stages, parse_args) -> None:
    """Every row of the ablation table, each a real run of the pipeline with one flag (`parse_args`: train.py's)."""
    defaults = vars(parse_args([]))
    rows = {}
    for name, flags in ABLATIONS.items():  # the command line's settings, and the row's flag on top
        print(f"\n=== ablation: {name} ({' '.join(flags) or 'no flag'}) ===")
        row = {k: v for k, v in vars(parse_args(flags)).items() if v != defaults[k]}
        rows[name] = run_pipeline(argparse.Namespace(**{**vars(args), "ablations": False, **row}), preset, stages)
    table = ablation_table(rows)
    atomic_write(args.out / "ablations.md", lambda tmp: tmp.write_text(table))
    print("\n" + table)


def ablation_table(rows: dict) -> str:
    lines = ["| variant | short-answer acc. | blind | multiple choice | stage 1 + 2 time |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        short, choice = r["scores"].get("short", {}), r["scores"].get("choice", {})
        t = sum(v for k, v in r["stage_seconds"].items() if k.startswith("stage"))
        lines.append(f"| {name} | {short.get('overall', {}).get('accuracy', 0):.1f} | "
                     f"{r['blind_scores'].get('short', {}).get('overall', {}).get('accuracy', 0):.1f} | "
                     f"{choice.get('overall', {}).get('accuracy', 0):.1f} | {t:.0f}s |")
    return "\n".join(lines) + "\n"
