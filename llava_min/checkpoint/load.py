"""Checkpoint layouts -> llava-min models.

Layouts read:
- CLIP: a full `CLIPModel` (`vision_model.*` + a text tower we skip) or a vision-only model.
- LLaMA / Vicuna: `model.*` + `lm_head.weight`.
- llava-hf: hub names (`vision_tower.vision_model.*`, `language_model.model.*`, `multi_modal_projector.*`),
  what transformers 5 writes (`vision_tower.*`) and its in-memory names (`model.language_model.*`, ...).
- official LLaVA (`liuhaotian/llava-v1.5-*`, `llava-v1.6-*`): Vicuna keys + `model.mm_projector.*` (1.6: +
  `model.image_newline` and the tuned tower); CLIP comes from the directory that `mm_vision_tower` names (or
  `vision_path`); a stage-1 `mm_projector.bin` goes on top of CLIP + Vicuna. See official.py.
The key names of every layout: names.py. LoRA adapters (peft's, the official LoRA release) go on top of these:
peft.py. Written by save.py.
"""
from pathlib import Path
from typing import Optional

import torch

from .configs import clip_vision_config, llama_config, llava_hf_config, read_config
from ..errors import OptionError
from ..files import read_json
from ..model.clip import VisionTower
from ..model.llama import Llama
from ..model.llava import Llava, LlavaConfig
from .names import (CLIP, IDENTITY_LAYER, LLAMA, LLAVA_HF, OFFICIAL, TRANSFORMERS, identity_layer, ignore_reason,
                    part_of, reader)
from .official import (is_multimodal_part, named_dir, official_settings, resolve_vision_path,
                       stage1_projector_file)
from .weights import CheckpointError, load_strict, materialize, read_tensors, tensor_names, weight_files


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_on_meta(cls, *args):
    with torch.device("meta"):
        return cls(*args)


def load_into(module, files, rename, dtype, device, keep=lambda key: True, allow_missing=()) -> list:
    """Strictly loads the kept tensors of `files` into `module` (`rename`: names.reader); returns the ignored keys
    with reasons."""
    return load_strict(module, read_tensors(files, keep), rename, ignore_reason, dtype, device, allow_missing)


# ---------------------------------------------------------------- CLIP and LLaMA on their own


def load_vision(path, select_layer: int = -2, select_feature: str = "patch", dtype=None, device="cpu") -> VisionTower:
    """A CLIP directory (full CLIPModel or vision-only) -> VisionTower; features = vision(pixel_values)."""
    model = build_on_meta(VisionTower, clip_vision_config(path), select_layer, select_feature)
    model.ignored_keys = load_into(model, weight_files(path), reader(CLIP), dtype or default_dtype(device), device)
    return model.eval()


def load_llama(path, dtype=None, device="cpu") -> Llama:
    """A LLaMA / Vicuna directory -> Llama; logits, loss = llm(input_ids, labels=...)."""
    model = build_on_meta(Llama, llama_config(read_config(path)))
    model.ignored_keys = load_into(model, weight_files(path), reader(LLAMA), dtype or default_dtype(device), device)
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------- LLaVA


def build_llava(vision_path, llm_path, projector_type="mlp2x_gelu", select_layer=-2, select_feature="patch",
                image_token_id: Optional[int] = None, dtype=None, device="cpu", **cfg_kwargs) -> Llava:
    """CLIP + LLaMA directories and a freshly initialized projector W: the start of stage 1.

    `image_token_id=None` adds an `<image>` token after the vocabulary, as llava-hf does (32000 for
    Vicuna, the vocabulary padded to a multiple of 64), so transformers can load what we train.
    """
    dtype = dtype or default_dtype(device)
    text, vision = llama_config(read_config(llm_path)), clip_vision_config(vision_path)
    check_select_layer(select_layer, vision, vision_path)
    cfg = LlavaConfig(vision=vision, text=text, projector_type=projector_type,
                      select_layer=select_layer, select_feature=select_feature,
                      image_token_id=text.vocab_size if image_token_id is None else image_token_id, **cfg_kwargs)
    model = build_on_meta(Llava, cfg)
    model.ignored_keys = (load_into(model.vision_tower, weight_files(vision_path), reader(CLIP), dtype, device)
                          + load_into(model.language_model, weight_files(llm_path), reader(LLAMA), dtype, device,
                                      keep=lambda k: not is_multimodal_part(k)))
    materialize(model.projector, device, dtype)
    model.language_model.tie_weights()
    if image_token_id is None:
        append_image_token(model)
    return model


def check_select_layer(select_layer: int, vision, vision_path) -> None:
    """The CLIP layer LLaVA reads must be one of this CLIP's hidden states (embeddings + its layers)."""
    n = vision.num_hidden_layers
    if not -(n + 1) <= select_layer <= n:
        raise OptionError(f"--select-layer {select_layer}: the CLIP in {vision_path} has {n} layers, so the layer is "
                          f"one of {-(n + 1)} to {n} (-2: the penultimate, LLaVA's)")


def append_image_token(model: Llava) -> None:
    """An `<image>` token after the vocabulary, the vocabulary padded to a multiple of 64, as llava-hf does
    (32000 for Vicuna): what a model using the official -200 placeholder needs before transformers loads it."""
    vocab = model.language_model.cfg.vocab_size
    model.cfg.image_token_id = vocab
    model.language_model.resize_vocab(-(-(vocab + 1) // 64) * 64)


def load_official(path, cfg: dict, dtype, device, vision_path=None, projector_path=None, llm_path=None) -> Llava:
    """An official LLaVA directory (Vicuna keys + model.mm_projector.*), a stage-1 release (config +
    mm_projector.bin; the LLM from `llm_path` or the directory `_name_or_path` names), or a LLaMA
    directory plus `projector_path`. CLIP comes from `vision_path` or the directory the config names."""
    if projector_path is None and stage1_projector_file(path):
        projector_path = stage1_projector_file(path)
        llm_path = llm_path or named_dir(cfg.get("_name_or_path"), path)
        if llm_path is None:
            raise CheckpointError(f"{path} holds a stage-1 projector; its LLM {cfg.get('_name_or_path')!r} is not a "
                                  "local directory or in the Hugging Face cache: pass --llm (llm_path=) <LLaMA directory>")
        path = llm_path
    proj_files = weight_files(projector_path or path)
    proj_cfg_file = Path(projector_path).parent / "config.json" if projector_path else None
    proj_cfg = read_json(proj_cfg_file) if proj_cfg_file and proj_cfg_file.is_file() else cfg
    settings = official_settings(proj_cfg, proj_files)
    vision_path = resolve_vision_path(proj_cfg, Path(projector_path).parent if projector_path else path, vision_path)
    model = build_llava(vision_path, path, dtype=dtype, device=device, **settings)
    if projector_path is not None:  # a projector file holds the projector and nothing else
        load_into(model.projector, proj_files, reader(OFFICIAL, part="projector"), dtype, device)
    else:  # a whole checkpoint's files hold the LLM too
        load_multimodal_parts(model, proj_files, dtype, device)
    return model


def load_multimodal_parts(model: Llava, files, dtype, device) -> None:
    """What an official checkpoint adds to CLIP + LLM: the projector, AnyRes's row-end vector (1.6), and the
    vision tower where 1.6 tuned it (its tensors replace CLIP's, as the official from_pretrained does)."""
    read = reader(OFFICIAL)
    in_part = lambda part: lambda key: part_of(read(key)) == part  # noqa: E731
    load_into(model.projector, files, reader(OFFICIAL, part="projector"), dtype, device, keep=in_part("projector"))
    if model.anyres is not None:
        load_into(model, files, read, dtype, device, keep=in_part("image_newline"),
                  allow_missing=("vision_tower.", "projector.", "language_model."))
    if any(in_part("vision_tower")(k) for k in tensor_names(files)):
        load_into(model.vision_tower, files, reader(OFFICIAL, part="vision_tower"), dtype, device,
                  keep=in_part("vision_tower"))


def load(path, dtype=None, device="cpu", vision_path=None, projector_path=None, llm_path=None) -> Llava:
    """Any supported LLaVA layout -> Llava (see the module docstring)."""
    dtype = dtype or default_dtype(device)
    if (Path(path) / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is a LoRA adapter, not a whole model: load it on its base "
                              "(llava_min.load_adapted; chat.py / llava_min.eval --model-base BASE; "
                              "python -m llava_min.lora merge)")
    cfg = read_config(path)
    if cfg.get("model_type") in ("llava", "llava_next") and "text_config" in cfg:
        model = build_on_meta(Llava, llava_hf_config(cfg))
        files = weight_files(path)
        keep = lambda key: True  # noqa: E731
        if model.cfg.projector_type == "linear":
            keep = lambda key: IDENTITY_LAYER not in key  # noqa: E731
            check_identity_layer(files)
        model.ignored_keys = load_into(model, files, reader(LLAVA_HF, TRANSFORMERS), dtype, device, keep=keep)
        if model.cfg.projector_type == "linear":
            model.ignored_keys += [(k, "the identity layer that stands for a linear projector in llava-hf's form")
                                   for k in tensor_names(files) if IDENTITY_LAYER in k]
        model.language_model.tie_weights()
    elif "mm_vision_tower" in cfg or (cfg.get("model_type") == "llama" and projector_path is not None):
        model = load_official(path, cfg, dtype, device, vision_path, projector_path, llm_path)
    else:
        raise CheckpointError(f"{path}/config.json: model_type {cfg.get('model_type')!r} is not a LLaVA layout "
                              "(llava-hf, official LLaVA, or a LLaMA directory + vision_path + projector_path); "
                              "for CLIP or LLaMA alone use load_vision / load_llama")
    return model.eval()


# ---------------------------------------------------------------- a linear W in llava-hf's two-layer form
# (names.IDENTITY_LAYER: W -> identity activation -> I, exactly W)

def check_identity_layer(files) -> None:
    """A linear projector's second layer, written for transformers, must be the identity it stands for."""
    found = {IDENTITY_LAYER + key.split(IDENTITY_LAYER)[1]: t.float()  # under any of the key namings
             for key, t, _ in read_tensors(files, lambda key: IDENTITY_LAYER in key)}
    if found:
        dim = found.get(IDENTITY_LAYER + "bias", torch.zeros(0)).numel()
        if found.keys() != identity_layer(dim).keys() or \
                not all(torch.equal(found[k], v) for k, v in identity_layer(dim).items()):
            raise CheckpointError(f"{files[0]}: the config says a linear projector, but {IDENTITY_LAYER}* is not "
                                  "the identity layer save_llava writes for one")
