"""llava-min models -> llava-hf directories (the hub's key names, which transformers 4.x and 5.x both
load), CLIP and LLaMA directories, stage 1's projector in the official stage-1 release layout, and LoRA
adapters in peft's layout. The key names: names.py."""
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .configs import SELECT_STRATEGY, read_config
from ..files import LOG, SNAPSHOT, atomic_dir, in_place, link_copy, recover_dir
from ..model.clip import VisionConfig, VisionTower, num_features
from ..model.llama import Llama, LlamaConfig
from ..model.llava import Llava, LlavaConfig
from .names import CLIP, HF_PARTS, LLAMA, LLAVA_HF, OFFICIAL, identity_layer, peft_key, writer
from .peft import PEFT_WEIGHTS, PLAIN_LORA
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
    save_pretrained(state(model.projector, writer(OFFICIAL, part="projector")), config, out_dir, tokenizer_path,
                    weights_name="mm_projector.safetensors")


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
        "projector_hidden_act": "linear" if cfg.projector_type == "linear" else "gelu",  # names.IDENTITY_LAYER
        "multimodal_projector_bias": True, "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "image_seq_length": num_features(cfg.vision, cfg.select_feature),
        "llava_min": {"projector_type": cfg.projector_type, "image_aspect_ratio": cfg.image_aspect_ratio,
                      "template": cfg.template},
    }


def state(module, rename) -> dict:
    """The module's tensors under a layout's names (`rename`: names.writer), a tied head left out."""
    tied = module.tied_names() if hasattr(module, "tied_names") else {}
    return {rename(k): v for k, v in module.state_dict().items() if k not in tied}


def save_pretrained(tensors: dict, config: dict, out_dir, tokenizer_path=None, extra_files: Optional[dict] = None,
                    weights_name="model.safetensors"):
    """`config.json` + `model.safetensors` (+ `tokenizer.model`), written whole or not at all (`checkpoint_dir`)."""
    with checkpoint_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / weights_name)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))


def is_checkpoint_file(name: str) -> bool:
    """What a checkpoint directory's next checkpoint replaces: configs, weights, the tokenizer, the log of the run
    that made it, and the training snapshot the checkpoint supersedes. Anything else (a user's notes) is kept."""
    return name.endswith((".safetensors", ".bin", ".model", ".pt", ".pth", ".index.json")) or \
        name in ("config.json", "adapter_config.json", SNAPSHOT, LOG) or name.startswith(f".{SNAPSHOT}.")


@contextmanager
def checkpoint_dir(out_dir):
    """A checkpoint is written into a temporary directory beside `out_dir` and swapped in with renames
    (files.atomic_dir): a crash at any point leaves the old complete checkpoint or the new complete one. The log
    of the run that made it (OUT/resume/metrics.jsonl) enters with it, in the same swap."""
    with atomic_dir(out_dir, carry=lambda name: not is_checkpoint_file(name)) as tmp:
        yield tmp
        log = Path(out_dir) / SNAPSHOT / LOG
        if log.is_file():
            link_copy(log, tmp / LOG)


def finished_checkpoint(path, recover: bool = True) -> Optional[Path]:
    """The file marking a finished checkpoint in `path` (config.json; an adapter's adapter_config.json), or None;
    a copy a crash left aside while it was being replaced is put back first (`recover`: by the process holding
    the directory's lock, files.only_run; without it, the copy that would be put back is looked at)."""
    path = Path(path)
    if recover:
        recover_dir(path)
    where = path if recover else in_place(path)
    return next((path / n for n in ("config.json", "adapter_config.json") if (where / n).is_file()), None)


def save_vision(tower: VisionTower, out_dir) -> None:
    """A CLIP vision directory (`CLIPVisionModel` layout) that `load_vision` and transformers read."""
    save_pretrained(state(tower, writer(CLIP)), hf_vision_config(tower.cfg), out_dir)


def save_llama(llm: Llama, out_dir, tokenizer_path=None) -> None:
    """A LLaMA directory (`LlamaForCausalLM` layout)."""
    save_pretrained(state(llm, writer(LLAMA)), hf_text_config(llm.cfg), out_dir, tokenizer_path)


def save_llava(model: Llava, out_dir, tokenizer_path=None, extra_files: Optional[dict] = None) -> None:
    """A llava-hf directory in the hub's key names."""
    if model.cfg.image_token_id < 0:
        raise CheckpointError(f"{out_dir}: the image placeholder {model.cfg.image_token_id} has no row in the "
                              "vocabulary, which llava-hf needs: call append_image_token(model) first")
    linear = model.projector.linear_2 is None
    extra = identity_layer(model.cfg.text.hidden_size, model.projector.linear_1.weight.dtype) if linear else {}
    save_pretrained(state(model, writer(LLAVA_HF)) | extra, hf_config(model.cfg), out_dir, tokenizer_path, extra_files)


# ---------------------------------------------------------------- LoRA adapters in peft's layout


def adapter_state(model) -> dict:
    """What an adapter checkpoint holds: every LoRA tensor, the (fully trained) projector, and AnyRes's row-end
    vector when the model has one (stage 2 trains it too)."""
    return {k: v for k, v in model.state_dict().items()
            if ".lora_" in k or k.startswith("projector.") or k == "image_newline"}


def target_modules(model) -> str:
    """peft's target_modules as a regular expression: the adapted layers by name, part by part (a list of
    names would reach CLIP's q_proj too), in either of transformers' namings."""
    patterns = []
    for part, hf_part in HF_PARTS.items():
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in getattr(model, part).named_modules() if hasattr(m, "lora_A")})
        if leaves:
            patterns.append(rf".*{hf_part}\.(.*\.)?({'|'.join(leaves)})")
    return "|".join(f"(?:{p})" for p in patterns)


def peft_adapter_config(model, base) -> dict:
    """peft's adapter_config.json: r and lora_alpha (the scaling is alpha / r), the layers, what trains fully."""
    cfg = next(getattr(model, p).lora_config for p in HF_PARTS if hasattr(getattr(model, p), "lora_config"))
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base) if base else None,
            "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": target_modules(model),
            # fully trained: the projector (stage 2 trains it) and AnyRes's row-end vector; peft wraps modules
            # only, and loads the vector's tensor by its name
            "modules_to_save": ["multi_modal_projector"] + (["image_newline"] if model.anyres is not None else []),
            "inference_mode": True, "init_lora_weights": True, "revision": None, "layers_pattern": None, **PLAIN_LORA}


def save_adapter(model, out_dir, base=None, tokenizer_path=None) -> None:
    """The adapter (`adapter_state`) in peft's layout, which PeftModel.from_pretrained reads on a llava-hf base,
    plus our config.json (the adapted model's llava-hf config: what a stage-1 base cannot say, the template and
    AnyRes's grids) and tokenizer.model; whole or not at all, as a full checkpoint."""
    if base is not None and Path(base).is_dir():  # relative to the adapter, as a stage-1 config names its parts
        base = os.path.relpath(Path(base).resolve(), Path(out_dir).resolve())
    peft_config = json.dumps(peft_adapter_config(model, base), indent=2).encode()
    save_pretrained({peft_key(k): v for k, v in adapter_state(model).items()}, hf_config(model.cfg), out_dir,
                    tokenizer_path, {"adapter_config.json": peft_config}, weights_name=PEFT_WEIGHTS[0])
