"""Research script behind docs/research/toy-research.md: stage 2 on cached visual features, many variants fast.

The frozen vision tower's features of every image are computed once (or an oracle's are written from the
annotation); then the projector and the LLM of a stage-1 model train on the single questions of
instruct.json's VQA records (vicuna_v1, batch 32, AdamW, clip 1.0), scored every --eval-every steps by
teacher-forced exact answers on eval.json's short-answer questions. Not part of the package; run from the
repository root after `python train.py` has built data/toy and runs/toy:

    PYTHONPATH=. python docs/research/cached_features.py --stage1 runs/toy/full/stage1 --constant-lr --steps 2000
    PYTHONPATH=. python docs/research/cached_features.py --stage1 runs/toy/full/stage1 --features oracle --constant-lr
    PYTHONPATH=. python docs/research/cached_features.py --stage1 runs/toy/full/stage1 --transform zca --constant-lr
    PYTHONPATH=. python docs/research/cached_features.py --stage1 runs/toy/full/stage1 --features oracle --llm DIR --constant-lr
    PYTHONPATH=. python docs/research/cached_features.py --stage1 runs/toy/full/stage1 --features oracle --types color \
        --constant-lr --steps 1000 --eval-every 250
    PYTHONPATH=. python docs/research/cached_features.py --stage1 runs/toy/full/stage1 --features words --types color \
        --constant-lr --steps 1000 --eval-every 250

Each evaluation also prints "color 2+", "position 2+" and "shape 2+": those questions on images with two to four
objects, where the answer needs the object the question names to be picked out (docs/toy.md, "Where it fails").
"""
import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch

import llava_min
from llava_min.conversation import tokenize_conversation
from llava_min.data.image import load_image, preprocess
from llava_min.model.projector import Projector
from llava_min.toy.whiten import feature_statistics
from llava_min.toy.world import COLORS, SHAPES, SIZES


# The training questions that name an object and ask for another of its attributes (instruct.json's VQA turns
# carry no type; these are the question generators' phrasings, questions.py).
FINDS = {"color": r"(What color is|What is the color of|Which color does) the (?!object)",
         "position": r"(Where is|In which part of the image is) the",
         "shape": r"(What shape is|What is the shape of|Which shape is) the \w+ object"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/toy"))
    p.add_argument("--stage1", type=Path, required=True, help="a stage-1 directory: its LLM, projector, tokenizer")
    p.add_argument("--vision", type=Path, help="another CLIP directory (then the projector starts fresh)")
    p.add_argument("--llm", type=Path, help="another LLM directory (replaces the stage-1 model's)")
    p.add_argument("--layer", type=int, default=-2)
    p.add_argument("--features", choices=["clip", "oracle", "words"], default="clip")
    p.add_argument("--transform", choices=["none", "zca", "standardize", "mix"], default="none",
                   help="zca: whiten; standardize: per dimension; mix: an ill-conditioned random mixing (for the oracle)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--constant-lr", action="store_true", help="constant after a 3%% warmup (default: cosine)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--types", nargs="+", choices=sorted(FINDS),
                   help="train only on these questions (then on all of them after --types-steps)")
    p.add_argument("--append-oracle", choices=["shape", "all"], help="append the oracle's shape columns (or all)")
    p.add_argument("--noise-dims", type=int, default=0, help="append this many fixed N(0, 1) columns per cell")
    p.add_argument("--keep", type=int, help="zca: whiten only the top-k principal directions, drop the rest")
    p.add_argument("--floor", type=float, default=1e-5, help="zca: eigenvalues below this share of the largest "
                   "are raised to it")
    p.add_argument("--types-steps", type=int, help="the steps that train only on --types (default: all of them)")
    p.add_argument("--init-scale", type=float, default=1.0, help="scale a fresh projector's first layer by this")
    return p.parse_args(argv)


def clip_features(vision, images: list, image_folder: Path) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            pixels = torch.stack([preprocess(load_image(n, image_folder), vision.cfg.image_size, "crop")
                                  for n in images[i: i + 256]])
            out.append(vision(pixels))
    return torch.cat(out)


def oracle_features(scenes: dict, images: list) -> torch.Tensor:
    """Per cell: one-hot colour, shape and size of its object (zeros if empty), one-hot row and column."""
    colors, shapes, sizes = list(COLORS), list(SHAPES), list(SIZES)
    attributes = len(colors) + len(shapes) + len(sizes)
    f = torch.zeros(len(images), 9, attributes + 6)
    for r in range(3):
        for c in range(3):
            f[:, r * 3 + c, attributes + r] = f[:, r * 3 + c, attributes + 3 + c] = 1
    for i, name in enumerate(images):
        for o in scenes[name]["objects"]:
            cell = f[i, o["row"] * 3 + o["col"]]
            cell[colors.index(o["color"])] = 1
            cell[len(colors) + shapes.index(o["shape"])] = 1
            cell[len(colors) + len(shapes) + sizes.index(o["size"])] = 1
    return f


def word_features(scenes: dict, images: list, model, tok) -> torch.Tensor:
    """Per cell: the sum of the LLM's input embeddings of its object's words ("small red triangle"; zeros if
    empty): the tokens a perfect stage-1 alignment would give."""
    embed = model.language_model.embed_tokens.weight.detach()
    f = torch.zeros(len(images), 9, embed.shape[-1])
    for i, name in enumerate(images):
        for o in scenes[name]["objects"]:
            f[i, o["row"] * 3 + o["col"]] = embed[tok.encode(f"{o['size']} {o['color']} {o['shape']}")].sum(0)
    return f


def extra_columns(args, scenes: dict, images: list, cells: tuple) -> list:
    """Columns appended to every cell: the oracle's (its shape, or all of it) and fixed Gaussian noise."""
    extra = []
    if args.append_oracle:
        oracle = oracle_features(scenes, images)  # colour (6) comes first, then shape (3)
        extra.append(oracle if args.append_oracle == "all" else oracle[..., len(COLORS): len(COLORS) + len(SHAPES)])
    if args.noise_dims:
        extra.append(torch.randn(*cells, args.noise_dims, generator=torch.Generator().manual_seed(1234)))
    return extra


def transform(feats: torch.Tensor, train_rows: torch.Tensor, kind: str, seed: int, keep=None,
              floor: float = 1e-5) -> torch.Tensor:
    train = feats[train_rows].reshape(-1, feats.shape[-1])
    if kind == "zca" and keep:  # PCA whitening of the top-k directions
        mu = train.mean(0)
        e, v = torch.linalg.eigh(torch.cov((train - mu).double().T))
        return ((feats - mu).double() @ v[:, -keep:] @ torch.diag(e[-keep:].rsqrt())).float()
    if kind == "zca":
        mu, whitening = feature_statistics(train, floor)
        return (feats - mu) @ whitening
    if kind == "standardize":
        return (feats - train.mean(0)) / train.std(0).clamp_min(1e-6)
    if kind == "mix":  # into 128 dimensions, singular values from 1 down to 0.03
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(128, 128, generator=g))
        mix = torch.randn(feats.shape[-1], 128, generator=g) / math.sqrt(feats.shape[-1])
        return ((feats - train.mean(0)) @ mix) @ q @ torch.diag(torch.logspace(0, -1.5, 128)) @ q.T
    return feats


def spectrum(feats: torch.Tensor) -> str:
    e = torch.linalg.eigvalsh(torch.cov(feats.reshape(-1, feats.shape[-1]).T)).flip(0)
    return ", ".join(f"top {k}: {100 * e[:k].sum() / e.sum():.1f}%" for k in (1, 5, 20))


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = llava_min.load(args.stage1, dtype=torch.float32, llm_path=args.llm)
    tok = llava_min.Tokenizer(args.stage1 / "tokenizer.model")
    image_id = model.cfg.image_token_id
    scenes = {s["image"]: s for s in json.loads((args.data / "scenes.json").read_text())}
    images = sorted(scenes)
    index = {name: i for i, name in enumerate(images)}
    train_rows = torch.tensor([n.startswith("train/") for n in images])
    if args.features == "oracle":
        feats = oracle_features(scenes, images)
    elif args.features == "words":
        feats = word_features(scenes, images, model, tok)
    else:
        vision = llava_min.load_vision(args.vision, select_layer=args.layer) if args.vision else model.vision_tower
        vision.num_blocks = args.layer % (vision.cfg.num_hidden_layers + 1)
        feats = clip_features(vision.eval(), images, args.data / "images")
    feats = transform(feats, train_rows, args.transform, args.seed, args.keep, args.floor)
    feats = torch.cat([feats, *extra_columns(args, scenes, images, feats.shape[:2])], -1)
    print(f"features {tuple(feats.shape)}; variance share of the principal directions: {spectrum(feats[train_rows])}")
    if args.features == "words":  # the LLM reads the word embeddings as they are, through a trainable identity
        model.projector = Projector("linear", feats.shape[-1], model.cfg.text.hidden_size)
        with torch.no_grad():
            model.projector.linear_1.weight.copy_(torch.eye(feats.shape[-1]))
            model.projector.linear_1.bias.zero_()
    elif feats.shape[-1] != model.cfg.vision.hidden_size or args.transform != "none" or args.vision:
        model.projector = Projector(model.cfg.projector_type, feats.shape[-1], model.cfg.text.hidden_size)
        with torch.no_grad():
            model.projector.linear_1.weight.mul_(args.init_scale)

    def encode(image, turns):
        ids, labels = tokenize_conversation(turns, tok, "vicuna_v1", num_image_tokens=9, image_token_id=image_id)
        return index[image], torch.tensor(ids), torch.tensor(labels)

    turns = [(r["image"], q["value"].replace("<image>\n", ""), a)
             for r in json.loads((args.data / "instruct.json").read_text()) if r["id"].endswith("-vqa")
             for q, a in zip(r["conversations"][::2], r["conversations"][1::2])]
    train = [encode(image, [{"from": "human", "value": "<image>\n" + q}, a]) for image, q, a in turns]
    focus = [x for x, (_, q, _) in zip(train, turns) if any(re.match(FINDS[t], q) for t in args.types or [])]
    evals = [r for r in json.loads((args.data / "eval.json").read_text()) if r["format"] == "short"]
    held_out = [(*encode(r["image"], r["conversations"]), r["question_type"]) for r in evals]
    several = [len(scenes[r["image"]]["objects"]) > 1 for r in evals]
    first = f" ({len(focus)} of them {'/'.join(args.types)} questions, trained on first)" if focus else ""
    print(f"{len(train)} training questions{first}, {len(held_out)} held-out", flush=True)

    def batch(items):
        width = max(len(x[1]) for x in items)
        ids = torch.full((len(items), width), tok.pad_id)
        labels = torch.full((len(items), width), -100)
        for i, x in enumerate(items):
            ids[i, : len(x[1])], labels[i, : len(x[2])] = x[1], x[2]
        return torch.tensor([x[0] for x in items]), ids, labels

    def forward(rows, ids, labels):
        is_image = ids == image_id
        embeds = model.language_model.embed_tokens(ids.masked_fill(is_image, 0)).clone()
        embeds[is_image] = model.projector(feats[rows]).reshape(-1, embeds.shape[-1])
        return model.language_model(inputs_embeds=embeds, labels=labels)

    @torch.no_grad()
    def evaluate():
        hits, counts = {}, {}
        for i in range(0, len(held_out), 64):
            chunk = held_out[i: i + 64]
            rows, ids, labels = batch(chunk)
            logits, _ = forward(rows, ids, labels)
            target = labels[:, 1:]
            exact = ((logits[:, :-1].argmax(-1) == target) | (target == -100)).all(1)
            for x, ok, many in zip(chunk, exact.tolist(), several[i: i + 64]):
                for key in [x[3]] + ([f"{x[3]} 2+"] if many and x[3] in FINDS else []):
                    hits[key], counts[key] = hits.get(key, 0) + ok, counts.get(key, 0) + 1
        per_type = {k: round(100 * hits[k] / counts[k], 1) for k in sorted(counts)}
        overall = [k for k in counts if not k.endswith("2+")]
        return round(100 * sum(hits[k] for k in overall) / sum(counts[k] for k in overall), 1), per_type

    params = list(model.projector.parameters()) + list(model.language_model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, int(0.03 * args.steps))

    def lr_scale(step):
        if step < warmup or args.constant_lr:
            return min(1.0, (step + 1) / warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    rng, order, t0 = random.Random(args.seed), [], time.time()
    focus_steps = (args.types_steps or args.steps) if focus else 0
    for step in range(args.steps):
        pool = focus if step < focus_steps else train
        if step == focus_steps:
            order = []
        if len(order) < args.batch_size:
            order += rng.sample(range(len(pool)), len(pool))
        items, order = [pool[j] for j in order[: args.batch_size]], order[args.batch_size:]
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_scale(step)
        _, loss = forward(*batch(items))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            overall, per_type = evaluate()
            print(f"step {step + 1}: {overall}% {per_type} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
