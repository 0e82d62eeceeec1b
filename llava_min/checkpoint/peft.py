"""LoRA adapters in the files the `peft` library reads and writes, and the official LLaVA LoRA release.

Layouts read (peft itself is never imported):
- peft's: `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules, modules_to_save, ...) +
  `adapter_model.safetensors` (or `.bin`). Keys are `base_model.model.` + the base model's names: an adapted
  layer's `<name>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], and the fully trained
  `modules_to_save` under their own names. On llava-hf models, in any of transformers' namings.
- the official LoRA release (`liuhaotian/llava-v1.5-7b-lora`): peft's files on LlavaLlamaForCausalLM's names,
  `non_lora_trainables.bin` (the projector, trained fully) and the official config.json; it goes on Vicuna,
  CLIP from `mm_vision_tower` (official llava/model/builder.py, load_pretrained_model with a model_base).
The key names: names.py (peft_to_ours). Written by save.py (save_adapter): peft's layout on the names of
transformers 5's llava-hf models, plus `config.json`, the adapted model's llava-hf config.
"""
import re
from pathlib import Path

import torch
from torch import nn

from .load import append_image_token, build_llava, load
from .configs import read_config
from ..files import read_json
from ..model.low_rank import LoRAConfig, add_lora, merge_lora
from .names import HF_PARTS, peft_to_ours
from .official import named_dir, official_settings, resolve_vision_path
from .weights import CheckpointError, read_tensors

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = "non_lora_trainables.bin"
# peft settings that change what an adapter computes, with the value plain LoRA has (the first ones are
# written too: every peft version since 0.9 knows them)
PLAIN_LORA = dict(use_dora=False, use_rslora=False, bias="none", fan_in_fan_out=False, rank_pattern={},
                  alpha_pattern={}, layers_to_transform=None)
NEWER_PLAIN_LORA = dict(lora_bias=False, trainable_token_indices=None, target_parameters=None, use_qalora=False,
                        alora_invocation_tokens=None)


def is_adapter(path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def is_official_release(path) -> bool:
    return (Path(path) / NON_LORA).is_file()


def adapter_config(path) -> dict:
    """adapter_config.json, refused (naming the setting) where it asks for more than plain LoRA."""
    file = Path(path) / "adapter_config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a LoRA adapter: it has no adapter_config.json")
    cfg = read_json(file)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type {cfg.get('peft_type')!r} is not supported (LORA)")
    for key, plain in {**PLAIN_LORA, **NEWER_PLAIN_LORA}.items():
        if cfg.get(key) not in (plain, None):
            raise CheckpointError(f"{file}: {key} {cfg[key]!r} is not supported (plain LoRA: {plain!r})")
    return cfg


def lora_config(cfg: dict) -> LoRAConfig:
    """r, alpha and dropout (which layers: the adapter's tensors say, see `apply_adapter`)."""
    return LoRAConfig(cfg["r"], float(cfg["lora_alpha"]), cfg.get("lora_dropout", 0.0))


def adapter_files(path) -> list:
    """The weight files of an adapter directory (+ the official release's fully trained projector)."""
    path = Path(path)
    found = [path / n for n in PEFT_WEIGHTS if (path / n).is_file()][:1]
    if not found:
        raise CheckpointError(f"no adapter weights in {path}: looked for {', '.join(PEFT_WEIGHTS)}")
    return found + ([path / NON_LORA] if is_official_release(path) else [])


def our_name(key: str, file) -> str:
    """A peft key (any llava-hf naming, or LlavaLlamaForCausalLM's) -> llava-min's name."""
    if re.search(r"\.lora_(embedding|magnitude)", key):
        raise CheckpointError(f"{key!r} in {file}: LoRA on embeddings and DoRA are not supported")
    name = peft_to_ours(key)
    if name is None:
        raise CheckpointError(f"unexpected tensor {key!r} in {file}: the model has no such parameter")
    return name


def adapter_tensors(path) -> dict:
    """llava-min name -> (tensor, file) for every tensor of an adapter directory."""
    tensors = {}
    for key, tensor, file in read_tensors(adapter_files(path)):
        name = our_name(key, file)
        if name in tensors:
            raise CheckpointError(f"tensor {key!r} in {file} maps to {name!r}, which was already loaded")
        tensors[name] = (tensor, file)
    return tensors


def add_adapter_layers(model, adapted: set, cfg: LoRAConfig) -> None:
    """LoRA on the adapted layers, part by part (the LLM; also CLIP and the projector where peft's
    target_modules reached them): every linear layer of a part whose name the adapter adapts."""
    for part in HF_PARTS:
        leaves = {n.rsplit(".", 1)[-1] for n in adapted if n.startswith(part + ".")}
        if part == "language_model" and leaves & {"lm_head", "embed_tokens"}:
            raise CheckpointError(f"LoRA on {sorted(leaves & {'lm_head', 'embed_tokens'})} is not supported")
        if leaves:
            add_lora(getattr(model, part), LoRAConfig(cfg.r, cfg.alpha, cfg.dropout, tuple(sorted(leaves))))


def set_tensor(model, name: str, tensor: torch.Tensor, file) -> None:
    """Copies a file's tensor into the model's parameter (a meta one, never loaded yet, is replaced)."""
    try:
        param = model.get_parameter(name)
    except AttributeError:
        raise CheckpointError(f"{name!r} in {file}: the model has no such parameter") from None
    if tuple(tensor.shape) != tuple(param.shape):
        raise CheckpointError(f"{name!r} in {file} has shape {tuple(tensor.shape)}, "
                              f"the model expects {tuple(param.shape)}")
    with torch.no_grad():
        if param.is_meta:
            parent, _, leaf = name.rpartition(".")
            device = next(p.device for p in model.parameters() if not p.is_meta)
            setattr(model.get_submodule(parent) if parent else model, leaf,
                    nn.Parameter(tensor.to(device=device, dtype=param.dtype)))
        else:
            param.copy_(tensor)


def apply_adapter(model, path, require=()) -> None:
    """Adds an adapter's LoRA layers to `model` and loads them strictly (each LoRA layer gets its A and B,
    every tensor lands somewhere, shapes checked); its fully trained tensors replace the base's.
    `require`: parameter name prefixes the adapter must hold (the official release's projector)."""
    cfg, tensors = adapter_config(path), adapter_tensors(path)
    lora_names = {n for n in tensors if n.endswith((".lora_A", ".lora_B"))}
    adapted = {n.rsplit(".", 1)[0] for n in lora_names}
    add_adapter_layers(model, adapted, lora_config(cfg))
    model.train(model.training)  # the new layers in the model's mode: no dropout in an eval-mode model
    expected = {n for n, _ in model.named_parameters() if ".lora_" in n}
    if expected != lora_names:
        diff = sorted(expected ^ lora_names)
        raise CheckpointError(f"{path}: the adapter's LoRA layers do not match the layers its names adapt: {diff[:4]}"
                              " (an adapter on some layers of a kind only is not supported)")
    for name, (tensor, file) in tensors.items():
        set_tensor(model, name, tensor, file)
    missing = sorted({n for n, p in model.named_parameters() if n.startswith(tuple(require)) and n not in tensors}
                     | {n for n, p in model.named_parameters() if p.is_meta})
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from {path}: {', '.join(missing[:8])}")


def adapted_settings(model, path) -> None:
    """What stage 2 trained with that its base does not say (stage 1 crops, has one view, may use the official
    -200 placeholder): from our config.json (save_adapter writes it; peft's own adapters have none)."""
    file = Path(path) / "config.json"
    cfg = read_json(file) if file.is_file() else {}
    if cfg.get("model_type") not in ("llava", "llava_next"):
        return
    extra = cfg.get("llava_min", {})
    pinpoints = cfg.get("image_grid_pinpoints") if cfg["model_type"] == "llava_next" else None
    aspect, template = extra.get("image_aspect_ratio"), extra.get("template")
    image_token = cfg.get("image_token_index", -1)
    if image_token >= 0 and model.cfg.image_token_id < 0:
        append_image_token(model)  # as train.py did before training the adapter
    if pinpoints and model.anyres is None:  # trained on AnyRes tiles from a one-view base
        model.use_anyres(pinpoints)
    model.cfg.image_aspect_ratio = aspect or model.cfg.image_aspect_ratio
    model.cfg.template = template or model.cfg.template


def adapter_base(path) -> Path:
    """The base an adapter names (peft's base_model_name_or_path): a local directory, else the Hugging Face
    cache's copy of that repo."""
    cfg = adapter_config(path)
    name = cfg.get("base_model_name_or_path")
    found = named_dir(name, path)
    if found is None:
        raise CheckpointError(f"{path} is a LoRA adapter on {name!r}, which is not a local directory or in the "
                              "Hugging Face cache: pass the base model (--model-base BASE)")
    return found


def load_official_release(path, base, dtype=None, device="cpu", vision_path=None):
    """The official LoRA release on its base LLM, as load_pretrained_model builds it: the release's config
    (projector type, CLIP layer, aspect), Vicuna's weights, CLIP from `mm_vision_tower`."""
    cfg = read_config(path)
    settings = official_settings(cfg, [Path(path) / NON_LORA])
    return build_llava(resolve_vision_path(cfg, path, vision_path), base, dtype=dtype, device=device, **settings)


def load_adapted(path, base=None, dtype=None, device="cpu", vision_path=None, llm_path=None):
    """An adapter directory on its base -> Llava with the LoRA layers in place (`merge_adapter` folds them)."""
    base = Path(base) if base is not None else adapter_base(path)
    if is_official_release(path):
        model = load_official_release(path, base, dtype, device, vision_path)
        apply_adapter(model, path, require=("projector.",))
    else:
        model = load(base, dtype=dtype, device=device, vision_path=vision_path, llm_path=llm_path)
        load_adapter(model, path)
    return model.eval()


def load_adapter(model, path) -> None:
    """Adds LoRA to a base model and loads an adapter strictly (every tensor, every shape), with the settings
    stage 2 trained with; the model keeps its mode (eval after `load`: no LoRA dropout)."""
    adapted_settings(model, path)
    apply_adapter(model, path)


def load_model(path, base=None, dtype=None, device="cpu", vision_path=None, llm_path=None):
    """What chat and the evaluation open: a whole checkpoint, or an adapter on `base` (official semantics of
    --model-base: an adapter's base, or the LLM a projector-only checkpoint goes on)."""
    if is_adapter(path):
        return load_adapted(path, base, dtype, device, vision_path, llm_path)
    return load(path, dtype=dtype, device=device, vision_path=vision_path, llm_path=llm_path or base)


def tokenizer_file(path, base=None) -> Path:
    """The checkpoint's tokenizer.model, else its base's (the official LoRA release ships none)."""
    own = Path(path) / "tokenizer.model"
    if own.is_file() or not is_adapter(path):
        return own
    return Path(base or adapter_base(path)) / "tokenizer.model"


def merge_adapter(model) -> None:
    """Folds every B A into its W: a plain model again."""
    for part in HF_PARTS:
        merge_lora(getattr(model, part))
