"""Batched greedy answers to LLaVA-format questions (left padding, the model's template and end marker),
and the checks that name a bad evaluation item before any answer is computed."""
import torch

from ..errors import DataError, ImageError, InputError


def question_turn(record: dict, blind: bool) -> list:
    """The record's first human turn; `blind` removes the image placeholder (the model sees no image)."""
    turn = dict(record["conversations"][0])
    if blind:
        turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "").strip()
    return [turn]


def left_pad(rows: list, pad_id: int):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


@torch.no_grad()
def answer(model, tok, records: list, image_folder=None, blind=False, batch_size=32, max_new_tokens=32,
           template=None, progress=False) -> list:
    """Greedy answers to each record's first question, batched with left padding."""
    from tqdm import tqdm

    from ..conversation import stop_text, tokenize_prompt
    from ..conversation import cut_at, stop_at
    from ..data.image import ImageSettings, image_input, load_image
    cfg, device = model.cfg, next(model.parameters()).device
    template, settings = template or cfg.template, ImageSettings.of(cfg)
    end = stop_text(template)
    answers = []
    for start in tqdm(range(0, len(records), batch_size), disable=not progress,
                      desc="eval, blind" if blind else "eval"):
        chunk = records[start: start + batch_size]
        rows, views = [], []
        for record in chunk:
            has_image = "image" in record and not blind
            view = image_input(load_image(record["image"], image_folder=image_folder), settings) if has_image else None
            rows.append(tokenize_prompt(question_turn(record, blind), tok, template,
                                        num_image_tokens=view.num_tokens if view else 0,
                                        image_token_id=cfg.image_token_id, has_image=has_image))
            views += [view] if view else []
        context = cfg.text.max_position_embeddings
        for record, row in zip(chunk, rows):
            if len(row) >= context:
                raise InputError(f"record {record.get('id')}: its prompt is {len(row)} tokens, the model's context "
                                 f"is {context}")
        budget = min(max_new_tokens, context - max(len(r) for r in rows))  # the answers stay inside the context
        ids, mask = left_pad(rows, tok.pad_id)
        dtype = next(model.vision_tower.parameters()).dtype
        pixels = torch.cat([v.pixel_values for v in views]).to(device, dtype) if views else None
        out = model.generate(ids.to(device), pixel_values=pixels, attention_mask=mask.to(device),
                             max_new_tokens=budget, image_sizes=[v.size for v in views], stop=stop_at(tok, end))
        answers += [cut_at(decode_until_eos(tok, row), end).strip() for row in out.tolist()]
    return answers


def decode_until_eos(tok, ids: list) -> str:
    return tok.decode(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids).strip()


def check_items(items, path, image_folder, check, images: bool = True) -> None:
    """Before any answer is generated (or any judge paid): `check(item)` on each, and (`images`) its
    image exists. The error (an InputError) names the file and the item."""
    from ..data.image import check_image_folder, find_image
    if not isinstance(items, list):
        raise InputError(f"{path}: not a JSON list")
    if images and any(isinstance(item, dict) and "image" in item for item in items):
        check_image_folder(image_folder)
    for n, item in enumerate(items):
        rid = item.get("id", f"#{n}") if isinstance(item, dict) else f"#{n}"
        try:
            if not isinstance(item, dict):
                raise DataError(f"a {type(item).__name__}, expected a JSON object")
            check(item)
            if "image" in item and images:
                image = item["image"]
                if not isinstance(image, str) or not image:
                    raise DataError(f"bad image field {image!r}")
                find_image(image, image_folder)
        except (DataError, ImageError) as e:
            raise InputError(f"{path}: record {rid}: {e}") from e


def check_fields(item: dict, types: dict) -> None:
    missing = [k for k in types if k not in item]
    if missing:
        raise DataError(f"missing {', '.join(missing)}")
    wrong = [f"{k} is a {type(item[k]).__name__}" for k, t in types.items() if not isinstance(item[k], t)]
    if wrong:
        raise DataError(", ".join(wrong))
