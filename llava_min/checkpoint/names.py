"""Every checkpoint layout's key names, in one table read both ways: a file's key -> llava-min's parameter name
when loading (`ours`, `reader`), llava-min's name -> the layout's key when saving (`theirs`, `writer`).

A layout is (its prefix, llava-min's prefix) pairs: `written` holds one pair per part, the names the layout is
saved with; `also_read` other spellings of the same parts that loading accepts. A key is renamed by the pair with
the longest prefix that matches it, so no pair shadows another (Vicuna's `model.` does not swallow
`model.mm_projector.`) and the order of the pairs does not matter.
"""
import re
from dataclasses import dataclass
from typing import Optional

import torch


def clip(theirs: str, ours: str) -> tuple:
    """A CLIP vision tower under a prefix: transformers' CLIPVisionTransformer holds its blocks in
    `encoder.layers.N`, llava-min's VisionTower in `layers.N`."""
    return (theirs + "encoder.layers.", ours + "layers."), (theirs, ours)


@dataclass(frozen=True)
class Layout:
    written: tuple  # (their prefix, our prefix) pairs, one per part: the names this layout is saved with
    also_read: tuple = ()  # other spellings of the same parts, read only


CLIP = Layout(clip("vision_model.", ""))  # CLIPModel or CLIPVisionModel (the text tower: `ignore_reason`)
LLAMA = Layout((("model.", ""), ("lm_head.", "lm_head.")))  # LlamaForCausalLM
LLAVA_HF = Layout(  # the hub's llava-hf names (transformers 4.x's in memory too), which every transformers loads
    clip("vision_tower.vision_model.", "vision_tower.")
    + (("multi_modal_projector.", "projector."), ("language_model.model.", "language_model."),
       ("language_model.lm_head.", "language_model.lm_head."), ("image_newline", "image_newline")),
    also_read=clip("vision_tower.", "vision_tower."))  # transformers 5's save_pretrained
TRANSFORMERS = Layout(  # transformers 5's llava-hf models in memory: the names peft records on them
    clip("model.vision_tower.", "vision_tower.")
    + (("model.multi_modal_projector.", "projector."), ("model.language_model.", "language_model."),
       ("lm_head.", "language_model.lm_head."), ("model.image_newline", "image_newline")),
    also_read=clip("model.vision_tower.vision_model.", "vision_tower."))  # transformers 4.52-4.57's
OFFICIAL = Layout(  # LlavaLlamaForCausalLM (official llava/model/language_model/llava_llama.py): Vicuna's names
    # plus the projector (nn.Sequential: Linear, GELU, Linear), LLaVA-NeXT's row-end vector, and the CLIP tower
    # 1.6 tuned (CLIPVisionTower.vision_tower, llava/model/multimodal_encoder/clip_encoder.py)
    clip("model.vision_tower.vision_tower.vision_model.", "vision_tower.")
    + (("model.mm_projector.0.", "projector.linear_1."), ("model.mm_projector.2.", "projector.linear_2."),
       ("model.image_newline", "image_newline"), ("model.", "language_model."), ("lm_head.", "language_model.lm_head.")),
    also_read=(("model.mm_projector.", "projector.linear_1."),)  # LLaVA v1's single linear layer
    + clip("model.vision_tower.vision_tower.", "vision_tower."))

# peft's adapters: PeftModel.base_model (the LoRA tuner) .model (the wrapped model), then the model's own names;
# a LoRA layer's matrices are its modules `lora_A` / `lora_B` (llava-min's LoRALinear holds them as parameters)
PEFT_PREFIX = "base_model.model."
PEFT_READ = (TRANSFORMERS, LLAVA_HF, OFFICIAL)  # transformers 5's, 4's, and the official LoRA release's models
PEFT_LORA = re.compile(r"\.(lora_[AB])\.weight$")
# the parts' module names in llava-hf models, the same in every naming above (peft's target_modules match them)
HF_PARTS = {"language_model": "language_model", "vision_tower": "vision_tower", "projector": "multi_modal_projector"}


def longest(pairs, name: str, side: int) -> Optional[tuple]:
    """The pair whose prefix on `side` (0: the layout's, 1: ours) is the longest that `name` starts with."""
    return max((p for p in pairs if name.startswith(p[side])), key=lambda p: len(p[side]), default=None)


def ours(key: str, *layouts: Layout) -> Optional[str]:
    """A key of any of `layouts` -> llava-min's name; None for a key none of them names."""
    pair = longest([p for layout in layouts for p in layout.written + layout.also_read], key, 0)
    return None if pair is None else pair[1] + key[len(pair[0]):]


def theirs(name: str, layout: Layout) -> str:
    """llava-min's name -> the key `layout` writes it under."""
    pair = longest(layout.written, name, 1)
    if pair is None:
        raise KeyError(f"{name!r} has no key in this layout")
    return pair[0] + name[len(pair[1]):]


def part_of(name: Optional[str]) -> Optional[str]:
    """The model part a llava-min name belongs to: vision_tower, projector, language_model or image_newline."""
    return None if name is None else name.split(".", 1)[0]


def reader(*layouts: Layout, part: str = ""):
    """key -> the name of a parameter of `part` (the whole model if ""), None for any other key."""
    def read(key: str) -> Optional[str]:
        name = ours(key, *layouts)
        if not part or name is None:
            return name
        return name[len(part) + 1:] if part_of(name) == part else None
    return read


def writer(layout: Layout, part: str = ""):
    """name of a parameter of `part` (the whole model if "") -> the key `layout` writes it under."""
    return lambda name: theirs(f"{part}.{name}" if part else name, layout)


def peft_key(name: str) -> str:
    """llava-min name -> peft's key for it on a transformers 5 llava-hf model."""
    module, _, leaf = name.rpartition(".")
    if leaf in ("lora_A", "lora_B"):
        return PEFT_PREFIX + theirs(module, TRANSFORMERS) + f".{leaf}.weight"
    return PEFT_PREFIX + theirs(name, TRANSFORMERS)


def peft_to_ours(key: str) -> Optional[str]:
    """peft's key (on any model of PEFT_READ) -> llava-min's name; None for a key none of them names."""
    lora = PEFT_LORA.search(key)
    module = key[: lora.start()] if lora else key
    name = ours(module.removeprefix(PEFT_PREFIX), *PEFT_READ)
    return None if name is None else name + (f".{lora.group(1)}" if lora else "")


def ignore_reason(key: str) -> Optional[str]:
    """Why a key every layout may carry is skipped, or None for a key that must be loaded."""
    if key.endswith("position_ids"):
        return "a buffer of positions 0..N, recomputed"
    if key.endswith("rotary_emb.inv_freq"):
        return "RoPE frequencies, recomputed from rope_theta"
    if key.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale")):
        return "CLIP's text tower and contrastive head, unused by LLaVA"
    return None


# llava-hf's projector is Linear -> act -> Linear: a linear W is written as W -> identity -> I, exactly W
IDENTITY_LAYER = theirs("projector.linear_2.", LLAVA_HF)


def identity_layer(dim: int, dtype=torch.float32) -> dict:
    """The second layer that stands for a linear W in llava-hf's two-layer projector."""
    return {IDENTITY_LAYER + "weight": torch.eye(dim, dtype=dtype),
            IDENTITY_LAYER + "bias": torch.zeros(dim, dtype=dtype)}
