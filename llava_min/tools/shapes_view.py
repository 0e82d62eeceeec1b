"""The tensors along Fig. 1, with their shapes and dtypes, read from one real forward pass.

X_v (the image) -> pixel_values -> patches (the patch embedding's convolution) -> CLIP hidden states at the
selected layer -> Z_v = g(X_v) -> H_v = W · Z_v (Eq. 1) -> the spliced input sequence (word embeddings with
H_v written into the image positions) -> logits. Forward hooks on the model's parts record what passes
through them, so the table shows what the model computed, not what its config promises. For AnyRes
(LLaVA-NeXT) also the grid, the tiles, the unpadded feature grid and the row-end tokens.
"""
import torch

from ..model.anyres import select_best_resolution, unpad_shape


@torch.no_grad()
def trace(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_sizes=None) -> dict:
    """name -> tensor for each stop of Fig. 1, recorded by hooks during `model(input_ids, pixel_values)`."""
    tower, seen = model.vision_tower, {}

    def keep(name):  # the first pass through a module is the one of this image
        def hook(module, args, *rest):
            seen.setdefault(name, rest[-1] if rest else args[0])
        return hook
    last_block = tower.layers[tower.num_blocks - 1] if tower.num_blocks else tower.pre_layrnorm
    handles = [module.register_forward_hook(keep(name)) for name, module in
               [("patches", tower.embeddings.patch_embedding), ("hidden", last_block), ("z_v", tower),
                ("h_v", model.projector)]]
    handles.append(model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: keep("spliced")(module, (kwargs["inputs_embeds"],)), with_kwargs=True))
    try:
        seen["logits"] = model(input_ids, pixel_values=pixel_values, image_sizes=image_sizes)[0]
    finally:
        for h in handles:
            h.remove()
    return seen


def shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> str:
    """Where the image sits in the sequence: "positions 5..580" (or several ranges)."""
    where = (input_ids[0] == image_token_id).nonzero().flatten().tolist()
    spans, start = [], None
    for k, p in enumerate(where):
        start = p if start is None else start
        if k + 1 == len(where) or where[k + 1] != p + 1:
            spans.append(f"{start}..{p}")
            start = None
    return ", ".join(spans)


def rows(model, image, seen: dict, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> list:
    """(stop, shape, dtype, note) rows of the table."""
    v, cfg = model.cfg.vision, model.cfg
    side = v.image_size // v.patch_size
    layer = model.vision_tower.num_blocks
    n_image = int((input_ids == cfg.image_token_id).sum())
    views = f"{len(pixel_values)} views (global + tiles)" if model.anyres else f"aspect {cfg.image_aspect_ratio}"
    out = [("X_v image", f"{image.width}x{image.height} px", image.mode, "width x height"),
           ("pixel_values", shape(pixel_values), dtype(pixel_values), f"{views}, CLIP-normalized"),
           ("patches", shape(seen["patches"]), dtype(seen["patches"]),
            f"conv {v.patch_size}x{v.patch_size} stride {v.patch_size}: {side}x{side} = {side * side} patches"),
           (f"CLIP hidden state {cfg.select_layer}", shape(seen["hidden"]), dtype(seen["hidden"]),
            f"CLS + patches, after block {layer} of {v.num_hidden_layers}"),
           ("Z_v = g(X_v)", shape(seen["z_v"]), dtype(seen["z_v"]), f"select_feature {cfg.select_feature}"),
           ("H_v = W · Z_v", shape(seen["h_v"]), dtype(seen["h_v"]), f"projector {cfg.projector_type} (Eq. 1)")]
    if model.anyres:
        merged = model.image_features(pixel_values, [(image.height, image.width)])[0]
        out += anyres_rows(model, (image.height, image.width), seen["h_v"], merged)
    out += [("input_ids", shape(input_ids), dtype(input_ids),
             f"{n_image} image positions ({image_positions(input_ids, cfg.image_token_id)}), "
             f"{input_ids.shape[1] - n_image} text"),
            ("spliced input", shape(seen["spliced"]), dtype(seen["spliced"]),
             "word embeddings, H_v in the image positions"),
            ("logits", shape(seen["logits"]), dtype(seen["logits"]), "a next-token distribution per position")]
    return out


def anyres_rows(model, size: tuple, h_v: torch.Tensor, merged: torch.Tensor) -> list:
    """The AnyRes geometry of an image of (height, width) `size`; `merged`: its visual tokens, as the model
    makes them (Llava.image_features)."""
    a = model.anyres
    rows_, cols = a.grid(size)
    best = select_best_resolution(size, a.pinpoints)
    r, c = unpad_shape(size, (rows_ * a.side, cols * a.side))
    d = h_v.shape[-1]
    return [("AnyRes grid", f"{rows_}x{cols} tiles", "", f"best resolution {best[1]}x{best[0]} px (width x height)"),
            ("  global view", shape(h_v[0]), dtype(h_v), f"the whole image squeezed to one {a.tile} px tile"),
            ("  tiles", shape(h_v[1:]), dtype(h_v), f"{len(h_v) - 1} tiles of {a.tile} px, row-major"),
            ("  tile feature grid", f"[{rows_ * a.side}, {cols * a.side}, {d}]", "", "the tiles' features side by side"),
            ("  unpadded grid", f"[{r}, {c}, {d}]", "", "rows/columns that saw only padding dropped"),
            ("  row ends", f"[{r}, {d}]", "", "image_newline after each row"),
            ("  visual tokens", shape(merged), dtype(merged),
             f"global {a.side * a.side} + grid {r * c} + row ends {r} = image_token_count "
             f"{model.image_token_count(size)}")]


def format_table(table: list) -> str:
    widths = [max(len(row[k]) for row in table) for k in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in table)
