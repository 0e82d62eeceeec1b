"""The toy pipeline behind `python train.py`: the whole method, from data to scores, on a laptop.

synthetic world (gen_data) -> tokenizer -> clip -> lm -> stage 1 -> stage 2 -> held-out evaluation.
Each step is skipped when its output exists, so a rerun resumes where the last one stopped. The
pretrained parts (data, tokenizer, clip, lm) are shared by every ablation; stage 1 and stage 2 live
in one directory per variant (runs/toy/full, runs/toy/linear, ...). `--world detail` builds the
AnyRes variant of the world under data/toy-detail and runs/toy-detail (variants full and anyres).
Each step's settings come from the plan (toy/plan.py).
"""
import json
import platform
import time
from pathlib import Path

import torch

from ..train.devices import use_bf16
from ..train.settings import Loop
from ..checkpoint.save import finished_checkpoint as finished
from ..files import atomic_write, same_settings, write_json
from .build import build_world
from .plan import ABLATIONS, ToyRun, made_with, plan, row_flags, variant_name, with_row
from .pretrain import stage_clip, stage_lm, stage_tokenizer

PRETRAINING = {"tokenizer": stage_tokenizer, "clip": stage_clip, "lm": stage_lm}


def check_settings(run: ToyRun, loop: Loop, run_dir: Path) -> None:
    world, models, variant = made_with(run, loop)
    same_settings(run.data_dir / "world.json", world, f"the world in {run.data_dir} was")
    same_settings(run.out / "settings.json", models, f"the models in {run.out} were")
    same_settings(run_dir / "settings.json", variant, f"the variant in {run_dir} was")


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


def seeded(fn, args: tuple, seed: int):
    def run():
        torch.manual_seed(seed)  # fresh weights depend on the seed, not on which stages ran before
        fn(*args)
    return run


def run_pipeline(run: ToyRun, loop: Loop, llava_stages: dict) -> dict:
    """One variant, from the world to its scores; `llava_stages`: train.py's stage 1 and 2 ("1", "2")."""
    data, root, run_dir = run.data_dir, run.out, run.out / variant_name(run)
    check_settings(run, loop, run_dir)
    timings = {**earlier_timings(run_dir / "results.json"), **recorded_seconds(data), **recorded_seconds(root),
               **recorded_seconds(run_dir)}
    world = made_with(run, loop)[0]
    step("data", (data / "eval.json").is_file(),
         lambda: build_world(data, world["num_images"], world["num_eval"], loop.seed,
                             image_size=run.toy.vision.image_size, progress=loop.progress, world=run.world),
         timings, data)
    functions = {**PRETRAINING, "stage 1": llava_stages["1"], "stage 2": llava_stages["2"]}
    for name, (out, args) in plan(run, loop).items():
        done = out.is_file() if name == "tokenizer" else finished(out)
        step(name, done, seeded(functions[name], args, loop.seed), timings, root if name in PRETRAINING else run_dir)
    stage1, stage2 = run_dir / "stage1", run_dir / "stage2"
    final = stage1 if run.no_stage2 else stage2
    t0 = time.perf_counter()
    results = evaluate_run(final, data, loop)
    took = round(time.perf_counter() - t0, 1)  # the whole: each step's time when it ran, and this evaluation
    results.update(variant=variant_name(run), world=run.world, seed=loop.seed, device=device_name(loop.device),
                   precision="bf16 autocast" if use_bf16(loop.device, loop.bf16) else "fp32",
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


def evaluate_run(model_dir: Path, data: Path, loop: Loop) -> dict:
    from ..checkpoint.peft import load_model
    from ..eval.score import evaluate
    from ..tokenizer import Tokenizer
    model = load_model(model_dir, dtype=torch.float32, device=loop.device)  # (a LoRA stage 2: on its stage 1)
    tok = Tokenizer(model_dir / "tokenizer.model")
    seen = evaluate(model, tok, data / "eval.json", data / "images", progress=loop.progress)
    blind = evaluate(model, tok, data / "eval.json", data / "images", blind=True, progress=loop.progress)
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


def run_ablations(run: ToyRun, loop: Loop, llava_stages: dict) -> None:
    """Every row of the ablation table, each a real run of the pipeline with the row's one choice on top."""
    rows = {}
    for name, row in ABLATIONS.items():
        print(f"\n=== ablation: {name} ({row_flags(row) or 'no flag'}) ===")
        rows[name] = run_pipeline(with_row(run, row), loop, llava_stages)
    table = ablation_table(rows)
    atomic_write(run.out / "ablations.md", lambda tmp: tmp.write_text(table))
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
