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

from .anyres import AnyRes
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
    image_grid_pinpoints: Optional[list] = None  # AnyRes (LLaVA-NeXT): tile grids as (height, width); None: one view


def anyres_of(cfg: LlavaConfig) -> Optional[AnyRes]:
    """The AnyRes tiling a config asks for: tiles of the encoder's size on its grids (None: one view)."""
    if not cfg.image_grid_pinpoints:
        return None
    return AnyRes(cfg.vision.image_size, cfg.vision.patch_size, [tuple(p) for p in cfg.image_grid_pinpoints])


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision, cfg.select_layer, cfg.select_feature)
        self.projector = Projector(cfg.projector_type, cfg.vision.hidden_size, cfg.text.hidden_size)
        self.language_model = Llama(cfg.text)
        self.anyres = None
        if cfg.image_grid_pinpoints:
            self.use_anyres(cfg.image_grid_pinpoints)

    def use_anyres(self, pinpoints: list) -> None:
        """Switch to AnyRes tiles with a fresh row-end vector (LLaVA-NeXT's stage 2 starts so)."""
        if self.cfg.select_feature != "patch":
            raise ValueError("AnyRes needs select_feature 'patch' (the tiles' features form a grid)")
        self.cfg.image_grid_pinpoints = [list(p) for p in pinpoints]
        self.anyres = anyres_of(self.cfg)
        w = self.projector.linear_1.weight
        self.image_newline = nn.Parameter(torch.randn(self.cfg.text.hidden_size, device=w.device, dtype=w.dtype)
                                          / self.cfg.text.hidden_size ** 0.5)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image (for AnyRes, see `image_token_count`: it depends on the image's size)."""
        return self.vision_tower.num_tokens

    def image_token_count(self, size: tuple) -> int:
        """Visual tokens for an image of (height, width) `size`: what `<image>` expands to."""
        return self.anyres.num_tokens(size) if self.anyres else self.num_image_tokens

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Eq. 1: H_v = W · g(X_v), [num_images, num_tokens, text_hidden]."""
        return self.projector(self.vision_tower(pixel_values))

    def image_features(self, pixel_values: torch.Tensor, image_sizes=None) -> list:
        """One [num_tokens, D] tensor per image. AnyRes: `pixel_values` holds every image's tiles
        ([global view, tile, ...] one image after the other) and `image_sizes` their (height, width)."""
        h_v = self.visual_tokens(pixel_values)
        if self.anyres is None:
            return list(h_v)
        sizes, counts = self.tiles_per_image(image_sizes, len(h_v))
        return [self.anyres.merge(f, size, self.image_newline) for f, size in zip(h_v.split(counts), sizes)]

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor], image_sizes=None,
              image_unused: bool = False) -> torch.Tensor:
        """Fig. 1: the instruction's word embeddings, with each image-token position taking the next visual
        token H_v, in order. `image_unused`: the image runs through g and W but none of its tokens is placed
        (a training micro-batch without images, see stages.with_blank_image)."""
        is_image = input_ids == self.cfg.image_token_id
        n_slots = self.count_slots(input_ids, is_image, pixel_values)
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # image slots: any row
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values, image_sizes)
        if image_unused:
            return keep_in_graph(embeds, features)
        self.check_slots(n_slots, features)
        embeds = embeds.clone()
        embeds[is_image] = torch.cat(features).to(embeds.dtype)  # the splice
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, image_sizes=None, return_logits: bool = True,
                image_unused: bool = False):
        """Returns (logits, loss). `labels` align with `input_ids` (shifted inside), -100 ignored;
        image positions must carry -100 (the data pipeline does this, Table 2). `return_logits=False`
        (training): (None, loss), computed at the supervised positions only."""
        embeds = self.embed(input_ids, pixel_values, image_sizes, image_unused)
        return self.language_model(labels=labels, attention_mask=attention_mask, cache=cache, inputs_embeds=embeds,
                                   return_logits=return_logits)

    # ------------------------------------------------------------ the splice's checks
    def count_slots(self, input_ids: torch.Tensor, is_image: torch.Tensor, pixel_values) -> int:
        """Image slots in `input_ids`, checking that every other id is a word of the vocabulary (the official
        -200 is not llava-hf's image token). One wait for the GPU for both; a single decoded token is never
        an image slot and is not checked (the check would wait for the GPU at every step)."""
        if input_ids.shape[1] == 1 and pixel_values is None:
            return 0
        bad = ((input_ids < 0) | (input_ids >= self.cfg.text.vocab_size)) & ~is_image
        n_slots, n_bad = torch.stack([is_image.sum(), bad.sum()]).tolist()
        if n_bad:
            raise ValueError(f"input_ids hold id {int(input_ids[bad][0])}, which is neither in the vocabulary "
                             f"({self.cfg.text.vocab_size} tokens) nor this model's image token "
                             f"{self.cfg.image_token_id}: tokenize with image_token_id=model.cfg.image_token_id")
        if n_slots and pixel_values is None:
            raise ValueError(f"input_ids hold image tokens (id {self.cfg.image_token_id}) but no pixel_values")
        return n_slots

    def tiles_per_image(self, image_sizes, n_tiles: int) -> tuple:
        """AnyRes: each image's (height, width) and its number of views (global + tiles), checked."""
        if image_sizes is None:
            raise ValueError("an AnyRes model needs image_sizes (height, width) with its pixel_values")
        sizes = [tuple(int(v) for v in size) for size in image_sizes]
        counts = [1 + r * c for r, c in (self.anyres.grid(size) for size in sizes)]
        if sum(counts) != n_tiles:
            raise ValueError(f"{n_tiles} tiles in pixel_values, but the image sizes call for {sum(counts)}")
        return sizes, counts

    def check_slots(self, n_slots: int, features: list) -> None:
        """As many image slots as visual tokens (transformers' masked_scatter raises likewise)."""
        n_features = sum(len(f) for f in features)
        if n_slots != n_features:
            per_image = f"{len(features)} image(s) x {len(features[0])} visual tokens" if self.anyres is None else \
                f"{len(features)} image(s) with {[len(f) for f in features]} visual tokens"
            raise ValueError(f"input_ids hold {n_slots} image tokens (id {self.cfg.image_token_id}) but "
                             f"{per_image} = {n_features} features")

    def tied_names(self) -> dict:
        return {"language_model." + k: "language_model." + v for k, v in self.language_model.tied_names().items()}

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.language_model.new_cache(batch_size, max_len)

    def decode_step(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoded token per row (text only: images enter at prefill); see `Llama.decode_step`."""
        return self.language_model.decode_step(input_ids, input_pos, cache)

    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, attention_mask=None, **kwargs) -> torch.Tensor:
        """New token ids [B, n]; left-pad batches and pass `attention_mask`."""
        return generate(self, input_ids, max_new_tokens, attention_mask=attention_mask, temperature=temperature,
                        top_p=top_p, eos_id=self.cfg.text.eos_token_id, pixel_values=pixel_values, **kwargs)


def keep_in_graph(embeds: torch.Tensor, features: list) -> torch.Tensor:
    """`embeds` plus a zero that depends on every trained visual parameter: under DDP / FSDP every process
    then runs the same modules and every trained parameter gets a gradient."""
    return embeds + 0.0 * torch.cat(features).sum().to(embeds.dtype)
