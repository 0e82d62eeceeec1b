"""LoRA adapters in the files the `peft` library reads and writes, and the official LLaVA LoRA release.

Layouts read (peft itself is never imported):
- peft's: `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules, modules_to_save, ...) +
  `adapter_model.safetensors` (or `.bin`). Keys are `base_model.model.` + the base model's names: an adapted
  layer's `<name>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], and the fully trained
  `modules_to_save` under their own names. On llava-hf models, in any of transformers' namings.
- the official LoRA release (`liuhaotian/llava-v1.5-7b-lora`): peft's files on LlavaLlamaForCausalLM's names,
  `non_lora_trainables.bin` (the projector, trained fully) and the official config.json; it goes on Vicuna,
  CLIP from `mm_vision_tower` (official llava/model/builder.py, load_pretrained_model with a model_base).
- llava-min's earlier format: `adapter.safetensors` on llava-min's names, `alpha` and `targets` in the config.
Written: peft's layout on the names of transformers 5's llava-hf models (what peft records for them), plus
`config.json`, the adapted model's llava-hf config: what a stage-1 base cannot say (template, AnyRes grids).
"""
import json
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from .load import LLAVA_PREFIXES, append_image_token, build_llava, load, renamer
from .configs import read_config
from ..files import read_json
from ..model.lora import LoRAConfig, add_lora, merge_lora
from .official import named_dir, official_settings, resolve_vision_path
from .save import hf_config, hub_key
from .weights import CheckpointError, read_tensors, save_safetensors

PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (the LoRA tuner) .model (the wrapped model)
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LEGACY_WEIGHTS = "adapter.safetensors"
NON_LORA = "non_lora_trainables.bin"
PARTS = {"language_model": "language_model", "vision_tower": "vision_tower", "projector": "multi_modal_projector"}
# peft settings that change what an adapter computes, with the value plain LoRA has (the first ones are
# written too: every peft version since 0.9 knows them)
PLAIN_LORA = dict(use_dora=False, use_rslora=False, bias="none", fan_in_fan_out=False, rank_pattern={},
                  alpha_pattern={}, layers_to_transform=None)
NEWER_PLAIN_LORA = dict(lora_bias=False, trainable_token_indices=None, target_parameters=None, use_qalora=False,
                        alora_invocation_tokens=None)


def adapter_state(model) -> dict:
    """What an adapter checkpoint holds: every LoRA tensor, the (fully trained) projector, and AnyRes's row-end
    vector when the model has one (stage 2 trains it too)."""
    return {k: v for k, v in model.state_dict().items()
            if ".lora_" in k or k.startswith("projector.") or k == "image_newline"}


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
    if "targets" in cfg:  # llava-min's earlier format
        return cfg
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type {cfg.get('peft_type')!r} is not supported (LORA)")
    for key, plain in {**PLAIN_LORA, **NEWER_PLAIN_LORA}.items():
        if cfg.get(key) not in (plain, None):
            raise CheckpointError(f"{file}: {key} {cfg[key]!r} is not supported (plain LoRA: {plain!r})")
    return cfg


def lora_config(cfg: dict) -> LoRAConfig:
    """r, alpha and dropout (which layers: the adapter's tensors say, see `apply_adapter`)."""
    if "targets" in cfg:
        return LoRAConfig(cfg["r"], cfg["alpha"], cfg["dropout"])
    return LoRAConfig(cfg["r"], float(cfg["lora_alpha"]), cfg.get("lora_dropout", 0.0))


def adapter_files(path) -> list:
    """The weight files of an adapter directory, in the format its adapter_config.json is in."""
    path = Path(path)
    names = (LEGACY_WEIGHTS,) if "targets" in adapter_config(path) else PEFT_WEIGHTS
    found = [path / n for n in names if (path / n).is_file()][:1]
    if not found:
        raise CheckpointError(f"no adapter weights in {path}: looked for {', '.join(names)}")
    return found + ([path / NON_LORA] if is_official_release(path) else [])


def our_name(key: str, file) -> str:
    """A peft key (any llava-hf naming, or LlavaLlamaForCausalLM's) -> llava-min's name."""
    if Path(file).name == LEGACY_WEIGHTS:
        return key
    module, lora = re.match(r"(.*?)(\.lora_[AB]\.weight)?$", key.removeprefix(PEFT_PREFIX)).groups()
    if re.search(r"\.lora_(embedding|magnitude)", key):
        raise CheckpointError(f"{key!r} in {file}: LoRA on embeddings and DoRA are not supported")
    name = renamer(LLAVA_PREFIXES)(module)
    if name is None:
        raise CheckpointError(f"unexpected tensor {key!r} in {file}: the model has no such parameter")
    return name + (lora[: -len(".weight")] if lora else "")


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
    for part in PARTS:
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
    -200 placeholder): from our config.json, or the earlier format's adapter_config.json."""
    file = Path(path) / "config.json"
    cfg = read_json(file) if file.is_file() else {}
    if cfg.get("model_type") in ("llava", "llava_next"):
        extra = cfg.get("llava_min", {})
        pinpoints = cfg.get("image_grid_pinpoints") if cfg["model_type"] == "llava_next" else None
        aspect, template = extra.get("image_aspect_ratio"), extra.get("template")
        image_token = cfg.get("image_token_index", -1)
    elif "targets" in (legacy := adapter_config(path)):  # train.py alone wrote it, after giving <image> a row
        pinpoints, aspect, template = (legacy.get(k) for k in ("image_grid_pinpoints", "image_aspect_ratio",
                                                               "template"))
        image_token = 0
    else:
        return
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
    name = cfg.get("base_model_name_or_path") or cfg.get("base")
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
        adapted_settings(model, path)
        apply_adapter(model, path)
    return model.eval()


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
    for part in PARTS:
        merge_lora(getattr(model, part))


# ---------------------------------------------------------------- writing peft's layout


def peft_name(name: str) -> str:
    """llava-min name -> the parameter's name in transformers 5's llava-hf model, under peft's prefix."""
    hub = hub_key(name)  # the hub's names; transformers 5 holds the same parts under `model.`
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("", "model.")):
        if hub.startswith(old):
            return PEFT_PREFIX + new + hub[len(old):]


def peft_key(name: str) -> str:
    lora = re.search(r"\.lora_[AB]$", name)
    return peft_name(name[: lora.start()]) + lora.group() + ".weight" if lora else peft_name(name)


def target_modules(model) -> str:
    """peft's target_modules as a regular expression: the adapted layers by name, part by part (a list of
    names would reach CLIP's q_proj too), in either of transformers' namings."""
    patterns = []
    for part, hf_part in PARTS.items():
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in getattr(model, part).named_modules() if hasattr(m, "lora_A")})
        if leaves:
            patterns.append(rf".*{hf_part}\.(.*\.)?({'|'.join(leaves)})")
    return "|".join(f"(?:{p})" for p in patterns)


def peft_adapter_config(model, base) -> dict:
    cfg = next(getattr(model, p).lora_config for p in PARTS if hasattr(getattr(model, p), "lora_config"))
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base) if base else None,
            "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": target_modules(model),
            # fully trained: the projector (stage 2 trains it) and AnyRes's row-end vector; peft wraps modules
            # only, and loads the vector's tensor by its name
            "modules_to_save": ["multi_modal_projector"] + (["image_newline"] if model.anyres is not None else []),
            "inference_mode": True, "init_lora_weights": True, "revision": None, "layers_pattern": None, **PLAIN_LORA}


def write_adapter(model, out_dir, base=None, tokenizer_path=None) -> None:
    """peft's adapter_config.json + adapter_model.safetensors, our config.json (+ tokenizer.model), into a fresh
    directory (lora.save_adapter swaps it in whole)."""
    out_dir = Path(out_dir)
    save_safetensors({peft_key(k): v for k, v in adapter_state(model).items()}, out_dir / PEFT_WEIGHTS[0])
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    (out_dir / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2))
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_adapter_config(model, base), indent=2))
