"""The official LLaVA release layouts (haotian-liu/LLaVA), read as llava-min settings.

- 1.5 (`liuhaotian/llava-v1.5-*`): a LLaMA config with mm_* keys added; Vicuna keys + `model.mm_projector.*`;
  CLIP comes from the directory `mm_vision_tower` names. A stage-1 release is `mm_projector.bin` alone.
- 1.6 / LLaVA-NeXT (`liuhaotian/llava-v1.6-*`): the same plus AnyRes (`image_aspect_ratio: "anyres"`,
  `mm_patch_merge_type: "spatial_unpad"`, `image_grid_pinpoints` as (width, height) pairs), the row-end
  vector `model.image_newline`, and the vision tower it fine-tuned (`model.vision_tower.vision_tower.*`).
The conventions are converted here, where they enter: the model keeps (height, width) throughout. The key
names are names.OFFICIAL.
"""
import os
from pathlib import Path
from typing import Optional

from .names import OFFICIAL, PEFT_PREFIX, ours, part_of
from .weights import CheckpointError, tensor_names

PROJECTOR_NAMES = ("mm_projector.safetensors", "mm_projector.bin")


def local_dir(name, base) -> Optional[Path]:
    """A directory named in a config: relative to the checkpoint first, then to the working directory."""
    for candidate in (Path(base) / str(name), Path(str(name))):
        if name and candidate.is_dir():
            return candidate
    return None


def hub_snapshot(name: str) -> Optional[Path]:
    """The Hugging Face cache's copy of repo `name` that `refs/main` points to (else its newest)."""
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
    repo = Path(hub) / f"models--{name.replace('/', '--')}"
    main = repo / "refs" / "main"
    snapshot = repo / "snapshots" / main.read_text().strip() if main.is_file() else None
    if snapshot is not None and (snapshot / "config.json").is_file():
        return snapshot
    snapshots = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1].parent if snapshots else None


def named_dir(name, base) -> Optional[Path]:
    """A directory a config names: a local directory, else the Hugging Face cache's snapshot of that repo."""
    return local_dir(name, base) or (hub_snapshot(str(name)) if name else None)


def resolve_vision_path(cfg: dict, path, vision_path):
    """The CLIP directory of an official checkpoint: `vision_path` if given, else `mm_vision_tower`
    if that names a local directory, else the Hugging Face cache's snapshot of that repo."""
    if vision_path is not None:
        return Path(vision_path)
    name = cfg.get("mm_vision_tower")
    found = named_dir(name, path)
    if found is None:
        raise CheckpointError(f"{path}/config.json names the vision tower {name!r}, which is not a local directory "
                              f"or in the Hugging Face cache: pass --vision (vision_path=) <CLIP directory>")
    return found


def stage1_projector_file(path) -> Optional[Path]:
    """The projector of an official stage-1 release (`mm_projector.bin`, or our `.safetensors`)."""
    return next((Path(path) / n for n in PROJECTOR_NAMES if (Path(path) / n).is_file()), None)


def is_multimodal_part(key: str) -> bool:
    """A tensor of an official checkpoint that is not the LLM's: the projector, the tuned tower, the row-end vector."""
    return part_of(ours(key, OFFICIAL)) not in (None, "language_model")


def official_projector_type(files) -> str:
    # (a LoRA release's non_lora_trainables.bin puts peft's prefix before the name)
    names = [ours(k.removeprefix(PEFT_PREFIX), OFFICIAL) or "" for k in tensor_names(files)]
    return "mlp2x_gelu" if any(n.startswith("projector.linear_2.") for n in names) else "linear"


def official_aspect(value: str) -> str:
    """The official trainer pads for "pad" and center-crops for the rest (its stage 1 writes "square");
    "anyres" (1.6) tiles instead, and a single view of it is padded."""
    if value not in ("pad", "square", "crop", "anyres"):
        raise CheckpointError(f"image_aspect_ratio {value!r} is not supported (pad, square, anyres)")
    return "crop" if value in ("square", "crop") else "pad"


def official_pinpoints(cfg: dict) -> Optional[list]:
    """AnyRes grids as (height, width). The official `select_best_resolution` (llava/mm_utils.py) reads
    `image_grid_pinpoints` as (width, height) pairs: each pair is swapped, their order kept (ties go to the
    first listed)."""
    if cfg.get("image_aspect_ratio") != "anyres":
        return None
    merge = cfg.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":  # official llava_arch.py: "flat" drops the grid, "spatial" keeps the padding
        raise CheckpointError(f"mm_patch_merge_type {merge!r} with anyres is not supported (spatial_unpad)")
    pinpoints = cfg.get("image_grid_pinpoints")
    pair = lambda p: isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p)  # noqa: E731
    if not isinstance(pinpoints, list) or not pinpoints or not all(pair(p) for p in pinpoints):
        raise CheckpointError(f"image_grid_pinpoints {pinpoints!r} is not a list of (width, height) pairs")
    return [[h, w] for w, h in pinpoints]


def release_template(model_type, vocab_size) -> str:
    """The conversation template of a released LLaVA-1.6 build, which the official CLI picks by the model's name
    (llava/serve/cli.py): Mistral's mistral_instruct, the 34B's (Nous-Hermes-2-Yi: 64000 tokens, 64064 in
    llava-hf's copy) chatml_direct, and Vicuna's vicuna_v1 (what the 1.5 training and evaluation scripts use)."""
    if model_type in ("mistral", "llava_mistral"):
        return "mistral_instruct"
    return "chatml_direct" if vocab_size in (64000, 64064) else "vicuna_v1"


def official_settings(cfg: dict, files) -> dict:
    """An official config -> `build_llava`'s arguments."""
    if cfg.get("mm_use_im_start_end"):
        raise CheckpointError("mm_use_im_start_end checkpoints (image start/end tokens) are not supported")
    return dict(projector_type=cfg.get("mm_projector_type") or official_projector_type(files),
                select_layer=cfg.get("mm_vision_select_layer", -2),
                select_feature=cfg.get("mm_vision_select_feature", "patch"),
                # the official placeholder -200, or (our stage 1) an `<image>` token appended to the vocabulary
                image_token_id=None if cfg.get("image_token_index", -1) >= 0 else -200,
                image_aspect_ratio=official_aspect(cfg.get("image_aspect_ratio", "pad")),
                image_grid_pinpoints=official_pinpoints(cfg),
                template=release_template(cfg.get("model_type"), cfg.get("vocab_size")))
