"""config.json files -> the model's dataclasses: transformers' CLIP, LLaMA and llava-hf configs, and the
official LLaVA configs (a LLaMA config with the mm_* keys added). A setting the model does not
implement is an error that names it, never a silent approximation."""
from dataclasses import fields
from pathlib import Path

from ..model.anyres import PINPOINTS
from ..model.clip import ACTIVATIONS, VisionConfig
from ..model.llama import LlamaConfig
from ..model.llava import LlavaConfig
from ..files import read_json
from .official import release_template
from .weights import CheckpointError

# transformers' CLIPVisionConfig / LlamaConfig defaults, for config.json files that omit a key.
HF_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SELECT_STRATEGY = {"default": "patch", "full": "cls_patch"}  # llava-hf name -> LLaVA name


def read_config(path) -> dict:
    """A checkpoint directory's config.json; the error says what the directory is when it is not a checkpoint."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        if (path / "adapter_config.json").is_file():
            raise CheckpointError(f"{path} is a LoRA adapter, not a whole model: open it on its base (chat.py or "
                                  f"llava_min.eval --model {path} --model-base BASE), or merge it (python -m "
                                  f"llava_min.lora merge --base BASE --adapter {path} --out DIR)")
        aside = path.with_name(f".{path.name}.old")  # files.atomic_dir's: a crash between its two renames
        raise CheckpointError(f"{path} has no config.json" if path.is_dir() else f"{path} is not a directory"
                              if path.exists() else f"{path} does not exist" + (
                                  f" (a crash while it was replaced left the old copy in {aside})" if aside.is_dir()
                                  else ""))
    config = read_json(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return config


def pick(cls, d: dict, defaults: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in {**defaults, **d}.items() if k in names})


def unsupported(d: dict, where: str, **allowed) -> None:
    """Settings a config may hold that this model does not implement: an error naming the first one."""
    for key, ok in allowed.items():
        value = d.get(key)
        if value is not None and value not in ok:
            raise CheckpointError(f"{where} {key} {value!r} is not supported (supported: {', '.join(map(repr, ok))})")


def vision_config(d: dict) -> VisionConfig:
    unsupported(d, "CLIP vision config:", hidden_act=tuple(ACTIVATIONS))
    return pick(VisionConfig, d, HF_CLIP_DEFAULTS)


def llama_config(d: dict) -> LlamaConfig:
    """A LLaMA config from transformers' config.json (Mistral's too, without a sliding window), or an
    official LLaVA config, which is one with the mm_* keys added."""
    if "text_config" in d:
        raise CheckpointError("a llava-hf LLaVA config where a LLaMA one belongs: its LLM is inside the LLaVA "
                              "checkpoint (load it whole, or pass a LLaMA / Vicuna directory)")
    unsupported(d, "LLaMA config:", model_type=("llama", "mistral", "llava_llama", "llava", "llava_mistral"),
                hidden_act=("silu",), attention_bias=(False,), mlp_bias=(False,))
    if d.get("num_key_value_heads") is None:
        d = {**d, "num_key_value_heads": d.get("num_attention_heads", 32)}  # no grouping, as transformers reads it
    if d.get("sliding_window"):  # Mistral's window: plain causal attention as long as sequences stay inside it
        d = {**d, "max_position_embeddings": min(d.get("max_position_embeddings", 4096), d["sliding_window"])}
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"RoPE scaling {rope} is not supported (plain LLaMA RoPE only)")
    d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    if d.get("pad_token_id") is None:
        d["pad_token_id"] = 0
    return pick(LlamaConfig, d, HF_LLAMA_DEFAULTS)


def clip_vision_config(path) -> VisionConfig:
    cfg = read_config(path)
    if cfg.get("model_type") == "clip":
        return vision_config(cfg.get("vision_config") or {})
    if cfg.get("model_type") != "clip_vision_model":
        raise CheckpointError(f"{path}/config.json: model_type {cfg.get('model_type')!r} is not a CLIP model")
    return vision_config(cfg)


def llava_hf_config(cfg: dict) -> LlavaConfig:
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"vision_feature_layer {layer} (several layers) is not supported")
    extra = cfg.get("llava_min", {})  # what llava-hf configs cannot say (written by save_llava)
    projector_type = extra.get("projector_type", "mlp2x_gelu")
    unsupported(cfg, "LLaVA config:", multimodal_projector_bias=(True,),  # a linear W is saved as W -> identity -> I
                projector_hidden_act=("linear", "gelu") if projector_type == "linear" else ("gelu",))
    vision, text_cfg = cfg.get("vision_config"), cfg.get("text_config") or {}
    text = llama_config(text_cfg)
    text.tie_word_embeddings = text.tie_word_embeddings or bool(cfg.get("tie_word_embeddings"))  # as transformers
    return LlavaConfig(
        vision=vision_config(vision) if vision else VisionConfig(),
        text=text,
        projector_type=projector_type,
        select_layer=layer,
        select_feature=SELECT_STRATEGY[cfg.get("vision_feature_select_strategy", "default")],
        image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
        image_aspect_ratio=extra.get("image_aspect_ratio", "pad"),
        template=extra.get("template") or (release_template(text_cfg.get("model_type"), text.vocab_size)
                                           if cfg.get("model_type") == "llava_next" else "vicuna_v1"),
        image_grid_pinpoints=(cfg.get("image_grid_pinpoints") or PINPOINTS) if cfg.get("model_type") == "llava_next" else None,
    )
