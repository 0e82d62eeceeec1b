"""llava-min models -> llava-hf directories (the hub's key names, which transformers 4.x and 5.x both
load), CLIP and LLaMA directories, and stage 1's projector in the official stage-1 release layout."""
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from .configs import SELECT_STRATEGY, read_config
from ..files import SNAPSHOT, atomic_dir, recover_dir
from ..model.clip import VisionConfig, VisionTower, num_features
from ..model.llama import Llama, LlamaConfig
from ..model.llava import Llava, LlavaConfig
from .weights import CheckpointError, save_safetensors


def save_stage1(model: Llava, out_dir, vision_path, llm_path, tokenizer_path=None) -> None:
    """Stage 1's output, as the official stage-1 releases: the projector alone (official key names) and
    a config naming the CLIP and LLM directories it goes with (relative paths: the tree can move)."""
    cfg, out_dir = model.cfg, Path(out_dir)
    rel = lambda p: os.path.relpath(Path(p).resolve(), out_dir.resolve())  # noqa: E731
    config = {**read_config(llm_path), "_name_or_path": rel(llm_path), "mm_vision_tower": rel(vision_path),
              "mm_projector_type": cfg.projector_type, "mm_hidden_size": cfg.vision.hidden_size,
              "mm_vision_select_layer": cfg.select_layer, "mm_vision_select_feature": cfg.select_feature,
              "image_aspect_ratio": cfg.image_aspect_ratio, "mm_use_im_start_end": False,
              "image_token_index": cfg.image_token_id}
    rename = lambda k: "model.mm_" + k.replace("linear_1", "0").replace("linear_2", "2")  # noqa: E731
    save_pretrained(model.projector, config, out_dir, lambda k: rename("projector." + k), tokenizer_path,
                    weights_name="mm_projector.safetensors")


IDENTITY_LAYER = "multi_modal_projector.linear_2."  # llava-hf has only Linear -> act -> Linear: a linear W


def identity_layer(dim: int, dtype=torch.float32) -> dict:
    return {IDENTITY_LAYER + "weight": torch.eye(dim, dtype=dtype),
            IDENTITY_LAYER + "bias": torch.zeros(dim, dtype=dtype)}


def hub_key(name: str) -> str:
    """llava-min name -> the llava-hf hub name (which transformers 4.x and 5.x both load)."""
    if name.startswith("vision_tower."):
        return "vision_tower." + vision_key(name[len("vision_tower."):])
    if name == "image_newline":
        return name
    if name.startswith("projector."):
        return "multi_modal_projector." + name[len("projector."):]
    if name.startswith("language_model.lm_head."):
        return name
    return "language_model.model." + name[len("language_model."):]


def hf_text_config(cfg: LlamaConfig) -> dict:
    return {**asdict(cfg), "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}


def hf_vision_config(cfg: VisionConfig) -> dict:
    return {**asdict(cfg), "model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]}


def hf_config(cfg: LlavaConfig) -> dict:
    text, vision = hf_text_config(cfg.text), hf_vision_config(cfg.vision)
    strategy = {v: k for k, v in SELECT_STRATEGY.items()}[cfg.select_feature]
    anyres = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
              "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints]} if cfg.image_grid_pinpoints else {}
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", **anyres,
        "text_config": text, "vision_config": vision, "image_token_index": cfg.image_token_id,
        "vision_feature_layer": cfg.select_layer, "vision_feature_select_strategy": strategy,
        "projector_hidden_act": "linear" if cfg.projector_type == "linear" else "gelu",  # linear: see IDENTITY_LAYER
        "multimodal_projector_bias": True, "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "image_seq_length": num_features(cfg.vision, cfg.select_feature),
        "llava_min": {"projector_type": cfg.projector_type, "image_aspect_ratio": cfg.image_aspect_ratio,
                      "template": cfg.template},
    }


def vision_key(name: str) -> str:
    return "vision_model." + (("encoder." + name) if name.startswith("layers.") else name)


def save_pretrained(module, config: dict, out_dir, rename, tokenizer_path=None, extra_files: Optional[dict] = None,
                    weights_name="model.safetensors", extra_tensors: Optional[dict] = None):
    """`config.json` + `model.safetensors` (+ `tokenizer.model`), written whole or not at all (`checkpoint_dir`)."""
    tied = module.tied_names() if hasattr(module, "tied_names") else {}
    tensors = {rename(k): v for k, v in module.state_dict().items() if k not in tied} | (extra_tensors or {})
    with checkpoint_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / weights_name)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))


def is_checkpoint_file(name: str) -> bool:
    """What a checkpoint directory's next checkpoint replaces: configs, weights, the tokenizer, and the training
    snapshot the checkpoint supersedes. Anything else there (the training log, a user's notes) is kept."""
    return name.endswith((".safetensors", ".bin", ".model", ".pt", ".pth", ".index.json")) or \
        name in ("config.json", "adapter_config.json", SNAPSHOT) or name.startswith(f".{SNAPSHOT}.")


@contextmanager
def checkpoint_dir(out_dir):
    """A checkpoint is written into a temporary directory beside `out_dir` and swapped in with renames
    (files.atomic_dir): a crash at any point leaves the old complete checkpoint or the new complete one."""
    with atomic_dir(out_dir, carry=lambda name: not is_checkpoint_file(name)) as tmp:
        yield tmp


def finished_checkpoint(path, recover: bool = True) -> Optional[Path]:
    """The file marking a finished checkpoint in `path` (config.json; an adapter's adapter_config.json), or None;
    a copy a crash left aside while it was being replaced is put back first (`recover`: by one process only)."""
    path = Path(path)
    if recover:
        recover_dir(path)
    return next((path / n for n in ("config.json", "adapter_config.json") if (path / n).is_file()), None)


def save_vision(tower: VisionTower, out_dir) -> None:
    """A CLIP vision directory (`CLIPVisionModel` layout) that `load_vision` and transformers read."""
    save_pretrained(tower, hf_vision_config(tower.cfg), out_dir, vision_key)


def save_llama(llm: Llama, out_dir, tokenizer_path=None) -> None:
    """A LLaMA directory (`LlamaForCausalLM` layout)."""
    rename = lambda k: k if k.startswith("lm_head.") else "model." + k  # noqa: E731
    save_pretrained(llm, hf_text_config(llm.cfg), out_dir, rename, tokenizer_path)


def save_llava(model: Llava, out_dir, tokenizer_path=None, extra_files: Optional[dict] = None) -> None:
    """A llava-hf directory in the hub's key names."""
    if model.cfg.image_token_id < 0:
        raise CheckpointError(f"{out_dir}: the image placeholder {model.cfg.image_token_id} has no row in the "
                              "vocabulary, which llava-hf needs: call append_image_token(model) first")
    linear = model.projector.linear_2 is None
    extra = identity_layer(model.cfg.text.hidden_size, model.projector.linear_1.weight.dtype) if linear else None
    save_pretrained(model, hf_config(model.cfg), out_dir, hub_key, tokenizer_path, extra_files, extra_tensors=extra)
