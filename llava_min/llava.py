"""LLaVA (Fig. 1): vision encoder g -> projection W -> visual tokens H_v spliced into the LLM's input.

The data pipeline expands each `<image>` placeholder into one `image_token_id` per visual token; the
model embeds the text, then writes the projected features into those positions in order (as
transformers' LlavaForConditionalGeneration does with `masked_scatter`). The image token may be an id
outside the vocabulary (the official code uses -200): those positions are never looked up.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .clip import VisionConfig, VisionTower
from .generate import generate
from .llama import KVCache, Llama, LlamaConfig
from .projector import Projector


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: LlamaConfig = field(default_factory=LlamaConfig)
    projector_type: str = "mlp2x_gelu"
    select_layer: int = -2
    select_feature: str = "patch"
    image_token_id: int = -200
    image_aspect_ratio: str = "pad"  # how the data pipeline squares images: "pad" (1.5) or "crop"
    template: str = "vicuna_v1"  # the conversation template the model was tuned with


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision, cfg.select_layer, cfg.select_feature)
        self.projector = Projector(cfg.projector_type, cfg.vision.hidden_size, cfg.text.hidden_size)
        self.language_model = Llama(cfg.text)

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.num_tokens

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Eq. 1: H_v = W · g(X_v), [num_images, num_tokens, text_hidden]."""
        return self.projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
        """Word embeddings with every image-token position replaced by the next visual token."""
        is_image = input_ids == self.cfg.image_token_id
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        if pixel_values is None:
            # (a single decoded token is never an image slot: skip the check, it costs a GPU sync)
            if input_ids.shape[1] > 1 and bool(is_image.any()):
                raise ValueError(f"input_ids hold image tokens (id {self.cfg.image_token_id}) but no pixel_values")
            return embeds
        h_v = self.visual_tokens(pixel_values)
        n_slots, (n_images, n_tokens) = int(is_image.sum()), h_v.shape[:2]
        if n_slots != n_images * n_tokens:
            raise ValueError(f"input_ids hold {n_slots} image tokens (id {self.cfg.image_token_id}) but "
                             f"{n_images} image(s) x {n_tokens} visual tokens = {n_images * n_tokens} features")
        embeds = embeds.clone()
        embeds[is_image] = h_v.flatten(0, 1).to(embeds.dtype)
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None):
        """Returns (logits, loss). `labels` align with `input_ids` (shifted inside), -100 ignored;
        image positions must carry -100 (the data pipeline does this, Table 2)."""
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model(labels=labels, attention_mask=attention_mask, cache=cache, inputs_embeds=embeds)

    def tied_names(self) -> set:
        return {"language_model." + n for n in self.language_model.tied_names()}

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.language_model.new_cache(batch_size, max_len)

    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, attention_mask=None, **kwargs) -> torch.Tensor:
        """New token ids [B, n]; left-pad batches and pass `attention_mask`."""
        return generate(self, input_ids, max_new_tokens, attention_mask=attention_mask, temperature=temperature,
                        top_p=top_p, eos_id=self.cfg.text.eos_token_id, pixel_values=pixel_values, **kwargs)
