"""Two-stage visual instruction tuning (LLaVA Sec. 4.2), and the toy pipeline that shows it end to end.

    python train.py                        # the whole toy pipeline: data, tokenizer, clip, lm, stage 1, stage 2, eval
    python train.py --stage 1 --vision CLIP_DIR --llm LLM_DIR --data pretrain.json --image-folder IMAGES --out OUT
    python train.py --stage 2 --init STAGE1_DIR --data instruct.json --image-folder IMAGES --out OUT
    torchrun --nproc_per_node 8 train.py --stage 2 ...   # DDP; rank 0 logs and saves

Stage 1 (feature alignment) trains only the projector W on caption pairs; stage 2 (end-to-end
fine-tuning) trains W and the LLM on instruction data; CLIP stays frozen in both. The toy world also
needs `--stage tokenizer`, `--stage clip` and `--stage lm`, because LLaVA starts from a pretrained CLIP and LLM.
Every record is checked before the first step; a finished model in --out is replaced only with --overwrite,
and only once the new one is complete (a crash leaves the old one or the new one, never half of one).
"""
import argparse
import os
from pathlib import Path

import torch

import llava_min
from llava_min.train import stages
from llava_min.cli import below_one, default_device, device, existing, fraction, positive, run, writable
from llava_min.errors import OptionError
from llava_min.files import only_run, recover_dir
from llava_min.conversation import TEMPLATES
from llava_min.data.dataset import collate
from llava_min.train.flops import llava_flops_per_token
from llava_min.train.recipes import RECIPES, given
from llava_min.checkpoint.load import append_image_token
from llava_min.checkpoint.save import finished_checkpoint, save_adapter, save_stage1
from llava_min.model.low_rank import LoRAConfig
from llava_min.train.settings import Choices, LlavaStage, Loop, StageRun, fallback_problem, resolve, stage_steps
from llava_min.train.stages import master_weights, run_stage
from llava_min.tokenizer import Tokenizer
from llava_min.toy.plan import ToyRun
from llava_min.toy.presets import TOY_PRESETS
from llava_min.toy.pretrain import stage_clip, stage_lm, stage_tokenizer
from llava_min.toy.world import WORLDS
from llava_min.train.devices import leave_world

TOY_STAGES = ("tokenizer", "clip", "lm")  # the toy's own models, before LLaVA's stages


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["tokenizer", "clip", "lm", "1", "2"],
                   help="one stage; none = the whole toy pipeline")
    p.add_argument("--preset", choices=sorted({**RECIPES, **TOY_PRESETS}), default="toy")
    p.add_argument("--data", type=existing(), help="training data (LLaVA JSON/JSONL; corpus.txt for --stage lm)")
    p.add_argument("--image-folder", type=existing("dir"))
    p.add_argument("--init", type=existing("dir"), help="stage 2: the stage-1 directory to start from")
    p.add_argument("--vision", type=existing("dir"), help="CLIP directory (stage 1, or stage 2 without stage 1)")
    p.add_argument("--llm", type=existing("dir"), help="LLaMA / Vicuna directory")
    p.add_argument("--tokenizer", type=existing(), help="tokenizer.model (default: the one beside the LLM / init)")
    p.add_argument("--out", type=writable("any"), help="one stage: its output directory (--stage tokenizer: file); "
                   "the toy pipeline: default runs/toy[-detail][-large] (by --world, --preset)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished model in --out")
    p.add_argument("--fallback-out", type=writable("dir"),
                   help="one stage: where the trained model is written if --out's disk is full at the end")
    p.add_argument("--data-dir", type=Path, help="toy pipeline: the world (default: data/toy[-detail][-large])")
    p.add_argument("--max-steps", type=positive(int))
    p.add_argument("--epochs", type=positive(float))
    p.add_argument("--batch-size", type=positive(int))
    p.add_argument("--grad-accum", type=positive(int))
    p.add_argument("--lr", type=positive(float))
    p.add_argument("--projector-lr", type=positive(float))
    p.add_argument("--projector", choices=["linear", "mlp2x_gelu"])
    p.add_argument("--select-layer", type=int, help="CLIP layer for the visual features (-2: penultimate)")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="conversation template for stage 2")
    p.add_argument("--max-length", type=positive(int))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP (sharded) instead of DDP")
    p.add_argument("--save-every", type=positive(int, zero_ok=True), default=0, help="snapshot every N steps (0: none)")
    p.add_argument("--stop-after", type=positive(int), help="leave after this many steps with a resumable snapshot")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--whiten-features", action=argparse.BooleanOptionalAction, default=None,
                   help="stages 1 and 2: train the projector in whitened feature coordinates (default: the preset's)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                   help="stages 1 and 2: batches of records of similar length, less padding (default: the preset's)")
    p.add_argument("--anyres", action="store_true", help="stage 2: AnyRes tiles + row-end tokens (LLaVA-NeXT)")
    p.add_argument("--lora", action="store_true", help="stage 2: LoRA adapters instead of the full LLM")
    p.add_argument("--lora-r", type=positive(int), default=128, help="the adapters' rank (LLaVA-1.5's LoRA: 128)")
    p.add_argument("--lora-alpha", type=positive(float),
                   help="updates scale by alpha / r (default: 2 x --lora-r, LLaVA-1.5's 256 for r 128)")
    p.add_argument("--lora-dropout", type=below_one, default=0.05)
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad records: fail fast or skip")
    p.add_argument("--num-workers", type=positive(int, zero_ok=True),
                   help="processes loading batches (default: 4 on CUDA, where loading in the training process idled "
                        "the GPU; 0 on CPU, whose cores do the arithmetic)")
    p.add_argument("--device", type=device, default=default_device(), help="default: cuda where there is one")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast, fp32 weights (default: on CUDA and on CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--no-progress", action="store_true")
    # toy pipeline switches: each ablation is one flag
    p.add_argument("--no-stage1", action="store_true", help="ablation: stage 2 from a random projector")
    p.add_argument("--no-stage2", action="store_true", help="ablation: alignment only, no instruction tuning")
    p.add_argument("--data-fraction", type=fraction, default=1.0, help="ablation: use this share of instruct.json")
    p.add_argument("--num-images", type=positive(int), help="toy world size (train images)")
    p.add_argument("--num-eval", type=positive(int), help="toy world size (held-out images)")
    p.add_argument("--world", choices=WORLDS, default="shapes",
                   help="toy world; detail: patterns a low-resolution view loses (compare with and without --anyres)")
    p.add_argument("--clip-decorrelation", type=float,
                   help="toy CLIP pretraining: weight of the term that decorrelates the features LLaVA reads")
    p.add_argument("--ablations", action="store_true", help="run the whole ablation table")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.stage is not None:
        check_stage_args(p, args)
    elif args.preset not in TOY_PRESETS:
        p.error(f"the toy pipeline (no --stage) runs a toy preset ({', '.join(TOY_PRESETS)}), not {args.preset}")
    elif args.fallback_out:
        p.error("--fallback-out is for one stage (--stage 1, 2, clip or lm): the toy pipeline's models are small")
    elif args.lora and args.no_stage1:
        p.error("--lora needs stage 1: an adapter is opened on the stage-1 model it was trained on")
    suffix = ("" if args.world == "shapes" else f"-{args.world}") + ("" if args.preset != "toy-large" else "-large")
    args.out = args.out or Path(f"runs/toy{suffix}")
    args.data_dir = args.data_dir or Path(f"data/toy{suffix}")
    if args.num_workers is None:
        args.num_workers = 4 if torch.device(args.device).type == "cuda" else 0
    if args.lora_alpha is None:  # the recipe's ratio (finetune_lora.sh: r 128, alpha 256)
        args.lora_alpha = 2.0 * args.lora_r
    return args


# what each stage cannot run without (stage 2 also needs --init, or --vision and --llm)
STAGE_NEEDS = {"tokenizer": ("data", "out"), "clip": ("data", "image_folder", "tokenizer", "out"),
               "lm": ("data", "tokenizer", "out"), "1": ("vision", "llm", "data", "image_folder", "out"),
               "2": ("data", "image_folder", "out")}


def check_stage_args(p, args) -> None:
    """Before any model loads: every flag the stage needs, its tokenizer, and an --out it may write."""
    needs = STAGE_NEEDS[args.stage] + (("vision", "llm") if args.stage == "2" and args.init is None else ())
    if args.stage in TOY_STAGES and args.preset not in TOY_PRESETS:
        p.error(f"--stage {args.stage} trains the toy's own model: pass a toy preset ({', '.join(TOY_PRESETS)})")
    missing = ["--" + k.replace("_", "-") for k in needs if getattr(args, k) is None]
    if missing:
        p.error(f"--stage {args.stage} needs {', '.join(missing)}"
                + (" (or --init STAGE1_DIR for --vision and --llm)" if {"--vision", "--llm"} & set(missing)
                   and args.stage == "2" else ""))
    if args.lora and args.stage == "2" and args.init is None:
        p.error("--lora needs --init STAGE1_DIR: an adapter is opened on the model it was trained on, and without "
                "stage 1 there is none to name")
    if args.stage == "2" and args.init is not None and args.select_layer is not None:
        p.error(f"--select-layer is fixed by the stage-1 model in --init {args.init}: leave it out")
    if args.stage in ("1", "2") and args.tokenizer is None:
        args.tokenizer = (args.init or args.llm) / "tokenizer.model"
        if not args.tokenizer.is_file():
            p.error(f"no tokenizer.model in {args.init or args.llm}: pass --tokenizer")
    is_file = args.stage == "tokenizer"
    if args.out.exists() and args.out.is_file() != is_file:
        p.error(f"--out {args.out} is a {'directory' if is_file else 'file'}, expected a "
                f"{'file (the tokenizer.model to write)' if is_file else 'directory'}")
    done = (args.out if args.out.exists() else None) if is_file else finished_checkpoint(args.out, recover=False)
    if done and not args.overwrite:
        p.error(f"--out {args.out} holds a finished {'tokenizer' if is_file else 'model'} ({done.name}): pass "
                "--overwrite to replace it (the new one takes its place only once complete), or another --out")
    wrong = args.fallback_out and fallback_problem(args.fallback_out, args.out, args.stage)
    if wrong:
        p.error(wrong)



# ---------------------------------------------------------------- each stage's settings, from the command line


def loop(args) -> Loop:
    return Loop(seed=args.seed, max_steps=args.max_steps, save_every=args.save_every, stop_after=args.stop_after,
                num_workers=args.num_workers, fsdp=args.fsdp, bf16=args.bf16, device=args.device,
                progress=not args.no_progress, fallback_out=args.fallback_out)


def choices(args) -> Choices:
    return Choices(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                   projector_lr=args.projector_lr, projector=args.projector, select_layer=args.select_layer,
                   template=args.template, max_length=args.max_length, grad_checkpointing=args.grad_checkpointing,
                   group_by_length=args.group_by_length, anyres=args.anyres, whiten_features=args.whiten_features,
                   lora=LoRAConfig(args.lora_r, args.lora_alpha, args.lora_dropout) if args.lora else None)


def llava_stage(args) -> tuple:
    """Stage 1's or 2's (StageRun, LlavaStage): the preset's settings with the command line's choices."""
    toy = TOY_PRESETS.get(args.preset)
    real_on_cuda = torch.device(args.device).type == "cuda" and not toy  # loads in bf16, cast per part in train_llava
    steps, stage = resolve(toy.recipe if toy else RECIPES[args.preset], args.stage, choices(args),
                           whiten=bool(toy and toy.whiten_features), image_folder=args.image_folder,
                           tokenizer=args.tokenizer, init=args.init, vision=args.vision, llm=args.llm,
                           data_fraction=args.data_fraction if args.stage == "2" else 1.0, on_error=args.on_error,
                           dtype=torch.bfloat16 if real_on_cuda else torch.float32)
    return StageRun(args.stage, args.data, args.out, steps, loop(args), resume=args.resume), stage


def toy_run(args) -> ToyRun:
    """What the toy pipeline takes from the command line; its other flags run the loop (`loop`) or one stage."""
    return ToyRun(preset=args.preset, world=args.world, num_images=args.num_images, num_eval=args.num_eval,
                  clip_decorrelation=args.clip_decorrelation, choices=choices(args), no_stage1=args.no_stage1,
                  no_stage2=args.no_stage2, data_fraction=args.data_fraction, out=args.out, data_dir=args.data_dir)


def train_llava(run: StageRun, s: LlavaStage, model, tok, save):
    stage, recipe = run.stage, s.recipe
    template = "plain" if stage == "1" else recipe.template
    data = stages.llava_dataset(run, s, model, tok, template, recipe.max_length)
    if s.whiten_features:  # a projector is fresh in stage 1, or without one
        if run.loop.fsdp:
            raise SystemExit("--whiten-features is not supported with --fsdp (pass --no-whiten-features)")
        from llava_min.toy.whiten import whitened
        save = whitened(model, data, save, fresh=stage == "1" or s.init is None)
    if torch.device(run.loop.device).type == "cuda":
        master_weights(model, stage, s.lora)
    groups = stages.freeze_for_stage(model, stage, run.steps.lr, s.projector_lr, lora=s.lora)  # LoRA: made in fp32
    model.language_model.grad_checkpointing = recipe.grad_checkpointing
    flops = llava_flops_per_token(model, recipe.max_length)
    pad = lambda items: collate(items, pad_id=tok.pad_id)  # noqa: E731
    chosen = {"whitened": s.whiten_features, "lora": [s.lora.r, s.lora.alpha, s.lora.dropout] if s.lora else None,
              "anyres": model.anyres is not None, "data_fraction": s.data_fraction,
              "projector": model.cfg.projector_type, "select_layer": model.cfg.select_layer, "template": template,
              "max_length": recipe.max_length, "init": str(s.init.resolve()) if s.init else None}
    return run_stage(run, model, groups, data, pad, stages.llava_loss, stages.num_targets, save, flops,
                     recipe.group_by_length, chosen)


def stage_1(run: StageRun, s: LlavaStage):
    tokenizer = s.tokenizer or s.llm / "tokenizer.model"
    model = llava_min.build_llava(s.vision, s.llm, s.recipe.projector, select_layer=s.recipe.select_layer,
                                  dtype=s.dtype, device=run.loop.device, template=s.recipe.template,
                                  image_aspect_ratio="crop")  # the plain CLIP processor, as the official pretrain.sh
    save = lambda out: save_stage1(model, out, s.vision, s.llm, tokenizer)  # noqa: E731
    return train_llava(run, s, model, Tokenizer(tokenizer), save)


def stage_2(run: StageRun, s: LlavaStage):
    if s.init is not None:  # ours, or an official stage-1 release (its CLIP and LLM from --vision / --llm)
        model = llava_min.load(s.init, dtype=s.dtype, device=run.loop.device, vision_path=s.vision, llm_path=s.llm)
        if model.cfg.image_token_id < 0:  # the official placeholder: give <image> a row, as llava-hf needs
            append_image_token(model)
        tokenizer = s.tokenizer or s.init / "tokenizer.model"
    else:  # no stage 1: CLIP + LLM + a random projector
        model = llava_min.build_llava(s.vision, s.llm, s.recipe.projector, select_layer=s.recipe.select_layer,
                                      dtype=s.dtype, device=run.loop.device, image_aspect_ratio=s.recipe.image_aspect)
        tokenizer = s.tokenizer or s.llm / "tokenizer.model"
    model.cfg.template = s.recipe.template
    model.cfg.image_aspect_ratio = s.recipe.image_aspect  # stage 1 cropped; stage 2 (LLaVA-1.5: pad) decides
    if s.recipe.anyres and model.anyres is None:  # LLaVA-NeXT: stage 1 on one view, stage 2 on tiles
        tile = model.cfg.vision.image_size
        model.use_anyres([(h * tile, w * tile) for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))])
    if s.lora is not None:  # the adapter (LoRA + projector) alone; `python -m llava_min.lora merge` makes a full model
        save = lambda out: save_adapter(model, out, base=s.init, tokenizer_path=tokenizer)  # noqa: E731
    else:
        save = lambda out: llava_min.save_llava(model, out, tokenizer)  # noqa: E731
    return train_llava(run, s, model, Tokenizer(tokenizer), save)


LLAVA_STAGES = {"1": stage_1, "2": stage_2}


def toy_stage(args) -> None:
    """--stage tokenizer, clip or lm: the toy preset's models, with the command line's lr, epochs and batch."""
    toy = given(TOY_PRESETS[args.preset], clip_decorrelation=args.clip_decorrelation)
    steps = stage_steps(toy.lm if args.stage == "lm" else toy.clip, choices(args))
    run = StageRun(args.stage, args.data, args.out, steps, loop(args), resume=args.resume)
    if args.stage == "tokenizer":
        stage_tokenizer(args.data, args.out, toy)
    elif args.stage == "clip":
        stage_clip(run, toy, args.tokenizer, args.image_folder)
    else:
        stage_lm(run, toy, args.tokenizer)


def main(argv=None):
    args = parse_args(argv)
    with only_run(args.out):  # one run per --out: a second would replace the first's model (torchrun: rank 0 locks)
        if args.stage != "tokenizer" and os.environ.get("RANK", "0") == "0":
            recover_dir(args.out)  # a swap a crash interrupted, finished by the one process allowed to
            if args.stage is not None and not args.overwrite and finished_checkpoint(args.out):
                raise OptionError(f"--out {args.out} holds a finished model, from a run that ended after this one "
                                  "started: pass --overwrite to replace it, or another --out")
        if args.stage is not None:
            torch.manual_seed(args.seed)  # fresh weights (a random projector, the toy models) depend on the seed only
            if args.stage in TOY_STAGES:
                toy_stage(args)
            else:
                LLAVA_STAGES[args.stage](*llava_stage(args))
            leave_world()  # not on an error: the other processes may be waiting in a collective
            return
        from llava_min.toy.pipeline import run_ablations, run_pipeline  # the toy pipeline (and its ablation table)
        (run_ablations if args.ablations else run_pipeline)(toy_run(args), loop(args), LLAVA_STAGES)


if __name__ == "__main__":
    run(main)
