"""Two-stage visual instruction tuning (LLaVA Sec. 4.2), and the toy pipeline that shows it end to end.

    python train.py                        # the whole toy pipeline: data, tokenizer, clip, lm, stage 1, stage 2, eval
    python train.py --stage 1 --vision CLIP_DIR --llm LLM_DIR --data pretrain.json --image-folder IMAGES --out OUT
    python train.py --stage 2 --init STAGE1_DIR --data instruct.json --image-folder IMAGES --out OUT
    torchrun --nproc_per_node 8 train.py --stage 2 ...   # DDP; rank 0 logs and saves

Stage 1 (feature alignment) trains only the projector W on caption pairs; stage 2 (end-to-end
fine-tuning) trains W and the LLM on instruction data; CLIP stays frozen in both. The toy world also
needs `--stage tokenizer`, `--stage clip` and `--stage lm`, because LLaVA starts from a pretrained CLIP and LLM.
"""
import argparse
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import llava_min
from llava_min import stages
from llava_min.checkpoints import append_image_token, save_llama, save_stage1, save_vision
from llava_min.clip import VisionConfig, VisionTower
from llava_min.clip_pretrain import ContrastiveCLIP
from llava_min.data import LlavaDataset, collate
from llava_min.llama import Llama, LlamaConfig
from llava_min.tokenizer import Tokenizer
from llava_min.trainer import TrainConfig, Trainer, leave_world
from llava_min.world import WORLDS


@dataclass
class StageSettings:
    lr: float
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1


@dataclass
class Preset:
    stage1: StageSettings
    stage2: StageSettings
    projector: str = "mlp2x_gelu"
    select_layer: int = -2
    template: str = "vicuna_v1"
    image_aspect: str = "pad"  # stage 2's (and so the finished model's); stage 1 center-crops (SPEC section 4)
    max_length: int = 2048
    grad_checkpointing: bool = False
    anyres: bool = False  # stage 2 on AnyRes tiles (LLaVA-NeXT)
    whiten_features: bool = False  # toy: train the projector in whitened coordinates (llava_min/whiten.py)
    group_by_length: bool = False  # stages 1 and 2: batches of records of similar length (less padding)
    # toy only: the world, the tiny models and their pretraining
    num_images: int = 0
    num_eval: int = 0
    vocab_size: int = 0
    vision: Optional[VisionConfig] = None
    text: Optional[LlamaConfig] = None
    clip_text: Optional[LlamaConfig] = None
    clip: Optional[StageSettings] = None
    lm: Optional[StageSettings] = None
    lm_seq_len: int = 128
    clip_decorrelation: float = 0.0  # weight of the toy CLIP's decorrelation term (clip_pretrain.decorrelation_loss)


PRESETS = {
    # SPEC section 7: LLaVA-1.5's official recipe. Global batch 256 / 128 = batch x accumulation x GPUs.
    "llava-v1.5-7b": Preset(stage1=StageSettings(lr=1e-3, batch_size=16, grad_accum=16),
                            stage2=StageSettings(lr=2e-5, batch_size=8, grad_accum=16), grad_checkpointing=True),
    # LLaVA-NeXT's recipe on the same parts: stage 2 on AnyRes tiles with row-end tokens.
    "llava-next-7b": Preset(stage1=StageSettings(lr=1e-3, batch_size=16, grad_accum=16),
                            stage2=StageSettings(lr=2e-5, batch_size=8, grad_accum=16), grad_checkpointing=True,
                            anyres=True),
    # The synthetic world on a laptop CPU: a 96 px CLIP with 32 px patches (9 visual tokens), a ~1M-parameter LLaMA.
    "toy": Preset(
        stage1=StageSettings(lr=1e-3, epochs=1, batch_size=32),
        stage2=StageSettings(lr=1e-3, epochs=6, batch_size=32),  # 6 epochs: 11.2 min in all on 2 CPU cores (README)
        image_aspect="crop", max_length=256, num_images=8000, num_eval=500, vocab_size=1024, whiten_features=True,
        group_by_length=True,
        vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                            image_size=96, patch_size=32),
        text=LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        clip_text=LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
        clip=StageSettings(lr=1e-3, epochs=2, batch_size=128),
        lm=StageSettings(lr=2e-3, epochs=0.5, batch_size=32)),
    # The same pipeline at a size that runs in seconds: tests and CI's smoke run.
    "smoke": Preset(
        stage1=StageSettings(lr=1e-3, batch_size=4), stage2=StageSettings(lr=1e-3, batch_size=4),
        image_aspect="crop", max_length=512, num_images=48, num_eval=12, vocab_size=400, whiten_features=True,
        group_by_length=True,
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8),
        text=LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
        clip_text=LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128),
        clip=StageSettings(lr=1e-3, batch_size=8), lm=StageSettings(lr=1e-3, batch_size=8), lm_seq_len=64),
}


def positive(kind, zero_ok: bool = False):
    """An argparse type: a number above zero (or at least zero), never a silent stand-in for the preset's."""
    def parse(text: str):
        value = kind(text)
        if not (value >= 0 if zero_ok else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'at least' if zero_ok else 'above'} 0, got {text}")
        return value
    return parse


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["tokenizer", "clip", "lm", "1", "2"],
                   help="one stage; none = the whole toy pipeline")
    p.add_argument("--preset", choices=sorted(PRESETS), default="toy")
    p.add_argument("--data", type=Path, help="training data (LLaVA JSON/JSONL; corpus.txt for --stage lm)")
    p.add_argument("--image-folder", type=Path)
    p.add_argument("--init", type=Path, help="stage 2: the stage-1 directory to start from")
    p.add_argument("--vision", type=Path, help="CLIP directory (stage 1, or stage 2 without stage 1)")
    p.add_argument("--llm", type=Path, help="LLaMA / Vicuna directory")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: the one beside the LLM / init)")
    p.add_argument("--out", type=Path, help="default: runs/toy (runs/toy-detail for --world detail)")
    p.add_argument("--data-dir", type=Path, help="toy pipeline: where the world lives (default: data/toy[-detail])")
    p.add_argument("--max-steps", type=positive(int))
    p.add_argument("--epochs", type=positive(float))
    p.add_argument("--batch-size", type=positive(int))
    p.add_argument("--grad-accum", type=positive(int))
    p.add_argument("--lr", type=positive(float))
    p.add_argument("--projector-lr", type=positive(float))
    p.add_argument("--projector", choices=["linear", "mlp2x_gelu"])
    p.add_argument("--select-layer", type=int, help="CLIP layer for the visual features (-2: penultimate)")
    p.add_argument("--template", help="conversation template for stage 2")
    p.add_argument("--max-length", type=positive(int))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP (sharded) instead of DDP")
    p.add_argument("--save-every", type=positive(int, zero_ok=True), default=0,
                   help="steps between resumable snapshots (0: none)")
    p.add_argument("--stop-after", type=positive(int), help="leave after this many steps with a resumable snapshot")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--whiten-features", action=argparse.BooleanOptionalAction, default=None,
                   help="stages 1 and 2: train the projector in whitened feature coordinates (default: the preset's)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                   help="stages 1 and 2: batches of records of similar length, less padding (default: the preset's)")
    p.add_argument("--anyres", action="store_true", help="stage 2: AnyRes tiles + row-end tokens (LLaVA-NeXT)")
    p.add_argument("--lora", action="store_true", help="stage 2: LoRA adapters instead of the full LLM")
    p.add_argument("--lora-r", type=positive(int), default=128)
    p.add_argument("--lora-alpha", type=positive(float), default=256.0)
    p.add_argument("--lora-dropout", type=positive(float, zero_ok=True), default=0.05)
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad records: fail fast or skip")
    p.add_argument("--num-workers", type=positive(int, zero_ok=True),
                   help="processes loading batches (default: 4 on CUDA, where loading in the training process idled "
                        "the GPU; 0 on CPU, whose cores do the arithmetic)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast, fp32 weights (default: on CUDA and on CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--no-progress", action="store_true")
    # toy pipeline switches (issue: each ablation is one flag)
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
    args = p.parse_args(argv)
    suffix = "" if args.world == "shapes" else f"-{args.world}"
    args.out = args.out or Path(f"runs/toy{suffix}")
    args.data_dir = args.data_dir or Path(f"data/toy{suffix}")
    args.num_workers = either(args.num_workers, 4 if torch.device(args.device).type == "cuda" else 0)
    return args


def either(value, default):
    return default if value is None else value


def load_dtype(args, preset: Preset):
    """Real (7B) models load in bf16 on CUDA and are cast per part in train_llava; toy models in fp32."""
    return torch.bfloat16 if torch.device(args.device).type == "cuda" and preset.vision is None else torch.float32


def settings(args, preset_stage: StageSettings) -> StageSettings:
    """The preset's settings for a stage, with any command-line overrides."""
    overrides = {k: getattr(args, k) for k in ("lr", "epochs", "batch_size", "grad_accum")
                 if getattr(args, k) is not None}
    return dataclasses.replace(preset_stage, **overrides)


def digest(path) -> str:
    """The training file's SHA-256 (its first 16 hex digits): a resumed run must read the snapshot's data."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def run(args, model, groups, dataset, collate_fn, loss_fn, count_fn, s: StageSettings, save, flops=0.0,
        group_by_length=False, chosen: Optional[dict] = None):
    """Trains one stage; `chosen`: the stage's settings a resumed run must share with its snapshot."""
    cfg = TrainConfig(out_dir=str(args.out), lr=s.lr, epochs=s.epochs, max_steps=args.max_steps,
                      batch_size=s.batch_size, grad_accum=s.grad_accum, seed=args.seed, resume=args.resume,
                      save_every=args.save_every, stop_after=args.stop_after, num_workers=args.num_workers,
                      fsdp=args.fsdp, group_by_length=group_by_length, bf16=args.bf16, progress=not args.no_progress)
    chosen = {"stage": args.stage, "data_sha256": digest(args.data), **(chosen or {})}
    trainer = Trainer(model, groups, dataset, collate_fn, loss_fn, count_fn, cfg, args.device, flops, chosen)
    losses = trainer.fit(save)
    base = getattr(dataset, "dataset", dataset)  # (under a Subset)
    dropped = getattr(base, "dropped", 0)
    if (trainer.skipped_total or dropped) and trainer.rank == 0:
        reasons = getattr(base, "skip_log", [])  # (those found as batches came: without loader workers only)
        print(f"skipped bad records (--on-error skip): {dropped} when the data was read in, "
              f"{trainer.skipped_total} as the batches came (each time one came up)"
              + "".join(f"\n  {m}" for m in reasons[:5]) + ("\n  ..." if len(reasons) > 5 else ""))
    return losses


# ---------------------------------------------------------------- stages

def stage_tokenizer(args, preset: Preset):
    """The toy's sentencepiece model, trained on --data (corpus.txt) and written to --out (a file)."""
    from llava_min.tokenizer import train_tokenizer
    train_tokenizer(args.data, args.out, preset.vocab_size)


def stage_clip(args, preset: Preset):
    tok = Tokenizer(args.tokenizer)
    text_cfg = dataclasses.replace(preset.clip_text, vocab_size=tok.vocab_size)
    torch.manual_seed(args.seed)
    decorrelation = either(args.clip_decorrelation, preset.clip_decorrelation)
    model = ContrastiveCLIP(VisionTower(preset.vision, select_layer=-1), text_cfg, feature_layer=preset.select_layer,
                            decorrelation=decorrelation).to(args.device)
    data = stages.CaptionPairs(args.data, args.image_folder, tok, preset.vision.image_size)
    groups = [{"params": list(model.parameters())}]
    return run(args, model, groups, data, stages.collate_pairs, stages.clip_loss, lambda batch: 1, settings(args, preset.clip),
               lambda: save_vision(model.vision_tower, args.out))


def stage_lm(args, preset: Preset):
    tok = Tokenizer(args.tokenizer)
    torch.manual_seed(args.seed)
    model = Llama(dataclasses.replace(preset.text, vocab_size=tok.vocab_size)).to(args.device)
    data = stages.PackedText(args.data, tok, preset.lm_seq_len)
    groups = [{"params": list(model.parameters())}]
    return run(args, model, groups, data, stages.collate_text, stages.lm_loss, stages.num_targets,
               settings(args, preset.lm), lambda: save_llama(model, args.out, args.tokenizer))


def llava_dataset(args, model, tok, template, max_length, data_fraction=1.0):
    data = LlavaDataset(args.data, tok, image_folder=args.image_folder, template=template,
                        num_image_tokens=model.num_image_tokens, image_token_id=model.cfg.image_token_id,
                        image_size=model.cfg.vision.image_size, image_aspect=model.cfg.image_aspect_ratio,
                        max_length=max_length, on_error=args.on_error, anyres=model.anyres)
    if len(data) == 0:
        raise SystemExit(f"{args.data}: no record left to train on, all {len(data.skip_log)} were skipped: "
                         + "; ".join(data.skip_log[:3]))
    if data_fraction < 1.0:  # a fixed, seeded subset (the half-data ablation)
        keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
        data = torch.utils.data.Subset(data, keep[: int(len(data) * data_fraction)].tolist())
    return data


def lora_config(args):
    from llava_min.lora import LoRAConfig
    return LoRAConfig(args.lora_r, args.lora_alpha, args.lora_dropout) if args.lora else None


def master_weights(model, stage: str, lora) -> None:
    """Frozen weights in bf16; trained ones keep fp32 masters (AnyRes's row-end vector, trained with the
    projector, too: a bf16 copy would round most of its small updates away)."""
    for part, trained in stages.STAGE_PARTS[stage].items():
        getattr(model, part).to(torch.float32 if trained and not (lora and part == "language_model") else torch.bfloat16)
    if model.anyres is not None:
        model.image_newline.data = model.image_newline.data.float()


def train_llava(args, preset: Preset, stage: str, model, tok, save):
    s = settings(args, preset.stage1 if stage == "1" else preset.stage2)
    projector_lr = args.projector_lr
    if stage == "2" and args.lora:  # LLaVA-1.5's LoRA recipe: 10x the lr for the adapter, the projector's unchanged
        projector_lr = projector_lr or preset.stage2.lr
        s = s if args.lr is not None else dataclasses.replace(s, lr=10 * preset.stage2.lr)
    lora = lora_config(args) if stage == "2" else None
    template = "plain" if stage == "1" else (args.template or preset.template)
    max_length = args.max_length or preset.max_length
    data = llava_dataset(args, model, tok, template, max_length, args.data_fraction if stage == "2" else 1.0)
    whiten = bool(either(args.whiten_features, preset.whiten_features))
    if whiten:  # a projector is fresh in stage 1, or without one
        save = whitened(args, model, data, save, fresh=stage == "1" or args.init is None)
    if torch.device(args.device).type == "cuda":
        master_weights(model, stage, lora)
    groups = stages.freeze_for_stage(model, stage, s.lr, projector_lr, lora=lora)  # LoRA adapters are made in fp32
    model.language_model.grad_checkpointing = preset.grad_checkpointing if args.grad_checkpointing is None \
        else args.grad_checkpointing
    flops = stages.llava_flops_per_token(model, max_length)
    pad = lambda items: collate(items, pad_id=tok.pad_id)  # noqa: E731
    chosen = {"whitened": whiten, "lora": [lora.r, lora.alpha, lora.dropout] if lora else None,
              "anyres": model.anyres is not None, "data_fraction": args.data_fraction if stage == "2" else 1.0,
              "projector": model.cfg.projector_type, "select_layer": model.cfg.select_layer, "template": template,
              "max_length": max_length}
    return run(args, model, groups, data, pad, stages.llava_loss, stages.num_targets, s, save, flops,
               either(args.group_by_length, preset.group_by_length), chosen)


def whitened(args, model, data, save, fresh: bool):
    """The projector's first layer in whitened coordinates for training; `save` then writes the plain layer."""
    from llava_min.whiten import folded, whiten_projector
    if args.fsdp:
        raise SystemExit("--whiten-features is not supported with --fsdp (pass --no-whiten-features)")
    whiten_projector(model, data, fresh)

    def save_folded():
        with folded(model):
            save()
    return save_folded


def stage_1(args, preset: Preset):
    tokenizer = args.tokenizer or args.llm / "tokenizer.model"
    model = llava_min.build_llava(args.vision, args.llm, args.projector or preset.projector,
                                  select_layer=either(args.select_layer, preset.select_layer),
                                  dtype=load_dtype(args, preset), device=args.device,
                                  image_aspect_ratio="crop",  # the plain CLIP processor, as the official pretrain.sh
                                  template=args.template or preset.template)
    save = lambda: save_stage1(model, args.out, args.vision, args.llm, tokenizer)  # noqa: E731
    return train_llava(args, preset, "1", model, Tokenizer(tokenizer), save)


def stage_2(args, preset: Preset):
    if args.init is not None:  # ours, or an official stage-1 release (its CLIP and LLM from --vision / --llm)
        model = llava_min.load(args.init, dtype=load_dtype(args, preset), device=args.device, vision_path=args.vision,
                               llm_path=args.llm)
        if model.cfg.image_token_id < 0:  # the official placeholder: give <image> a row, as llava-hf needs
            append_image_token(model)
        tokenizer = args.tokenizer or args.init / "tokenizer.model"
    else:  # no stage 1: CLIP + LLM + a random projector
        model = llava_min.build_llava(args.vision, args.llm, args.projector or preset.projector,
                                      select_layer=either(args.select_layer, preset.select_layer),
                                      dtype=load_dtype(args, preset), device=args.device,
                                      image_aspect_ratio=preset.image_aspect)
        tokenizer = args.tokenizer or args.llm / "tokenizer.model"
    model.cfg.template = args.template or preset.template
    model.cfg.image_aspect_ratio = preset.image_aspect  # stage 1 cropped; stage 2 (LLaVA-1.5: pad) decides the model's
    if (args.anyres or preset.anyres) and model.anyres is None:  # LLaVA-NeXT: stage 1 on one view, stage 2 on tiles
        tile = model.cfg.vision.image_size
        model.use_anyres([(h * tile, w * tile) for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))])
    if args.lora:  # the adapter (LoRA + projector) alone; `python -m llava_min.lora merge` makes a full model
        from llava_min.lora import save_adapter
        save = lambda: save_adapter(model, args.out, base=args.init, tokenizer_path=tokenizer)  # noqa: E731
    else:
        save = lambda: llava_min.save_llava(model, args.out, tokenizer)  # noqa: E731
    return train_llava(args, preset, "2", model, Tokenizer(tokenizer), save)


STAGES = {"tokenizer": stage_tokenizer, "clip": stage_clip, "lm": stage_lm, "1": stage_1, "2": stage_2}


def main(argv=None):
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    if args.stage is not None:
        torch.manual_seed(args.seed)  # fresh weights (a random projector, the toy models) depend on the seed only
        STAGES[args.stage](args, preset)
        leave_world()  # not on an error: the other processes may be waiting in a collective
        return
    from llava_min.toy import run_ablations, run_pipeline  # the toy pipeline (and its ablation table)
    (run_ablations if args.ablations else run_pipeline)(args, preset, STAGES)


if __name__ == "__main__":
    main()
