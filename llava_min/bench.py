"""Speed and memory of llava-min against transformers' LlavaForConditionalGeneration (SDPA attention).

Both models get the same config and the same weights, run in one process, alternating, after warm-up,
with `synchronize()` around every GPU timing; each figure is the median of the repeats.

    python -m llava_min.bench --config tiny            # anywhere (CI runs it)
    python -m llava_min.bench --config 7b --out bench.json   # CUDA: ViT-L/14-336 + a 7B LLaMA (bf16); 1B for training
"""
import argparse
import json
import statistics
import time
from contextlib import contextmanager

import torch

from .checkpoints import LLAVA_PREFIXES, build_on_meta, ignore_reason, renamer
from .clip import VisionConfig
from .llama import LlamaConfig
from .llava import Llava, LlavaConfig

from .trainer import peak_flops
from .weights import load_strict

# HBM bandwidth (bytes/s) for the decode roofline, keyed by a substring of the device name.
BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.0e12, "A100": 1.55e12}

VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14)
CONFIGS = {
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             image_size=56, patch_size=14),
                 text=dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2), train_text=None,
                 batch=4, prompt=100, new_tokens=32, train_len=128),
    "7b": dict(vision=VIT_L_336, text=dict(vocab_size=32064), train_text=dict(
                   vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4),  # a 1.1B LLaMA (TinyLlama's shape)
               batch=8, prompt=100, new_tokens=128, train_len=2048),
}


def configs(name: str, train: bool):
    c = CONFIGS[name]
    text = (c["train_text"] if train and c["train_text"] else c["text"])
    ours = LlavaConfig(vision=VisionConfig(**c["vision"]), text=LlamaConfig(**text, max_position_embeddings=4096),
                       image_token_id=text["vocab_size"] - 64)
    from transformers import CLIPVisionConfig, LlamaConfig as HFLlamaConfig, LlavaConfig as HFLlavaConfig
    theirs = HFLlavaConfig(vision_config=CLIPVisionConfig(**c["vision"]),
                           text_config=HFLlamaConfig(**text, rms_norm_eps=1e-5, max_position_embeddings=4096),
                           image_token_index=ours.image_token_id, vision_feature_layer=-2)
    return ours, theirs


def build_pair(name: str, train: bool, device, dtype):
    """transformers' model with random weights, and ours holding the very same tensors (copied)."""
    from transformers import LlavaForConditionalGeneration
    ours_cfg, hf_cfg = configs(name, train)
    torch.manual_seed(0)
    with torch.device(device):
        theirs = LlavaForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    ours = build_on_meta(Llava, ours_cfg)
    tensors = ((k, v.detach().clone(), "transformers") for k, v in theirs.state_dict().items())
    load_strict(ours, tensors, renamer(LLAVA_PREFIXES), ignore_reason, dtype, device)
    return ours, theirs


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device, out: dict):
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    yield
    out["peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20) if cuda else None


def timed(fn, device, warmup: int, repeats: int, other=None) -> tuple:
    """Median seconds of `fn` (and of `other`, interleaved with it) after warm-up."""
    for _ in range(warmup):
        fn(), other and other()
    times = {fn: [], other: []}
    for _ in range(repeats):
        for f in (fn, other) if other else (fn,):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[f].append(time.perf_counter() - t0)
    return statistics.median(times[fn]), statistics.median(times[other]) if other else None


def inputs(cfg: LlavaConfig, batch: int, text_len: int, device, dtype):
    g = torch.Generator().manual_seed(1)
    n_img = cfg.vision.num_patches
    text = torch.randint(3, cfg.text.vocab_size - 64, (batch, text_len), generator=g)
    ids = torch.cat([text[:, :1], torch.full((batch, n_img), cfg.image_token_id), text[:, 1:]], dim=1).to(device)
    pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g).to(device, dtype)
    return ids, pixels


def runs_on_flash(step) -> bool:
    """Does a training step run with SDPA restricted to the flash backend? (No kernel -> RuntimeError.)
    The check the design rests on: no mask tensor in training-shaped attention, so flash can take it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            step()
        return True
    except RuntimeError:
        return False


def train_row(name, device, dtype, warmup, repeats) -> dict:
    ours, theirs = build_pair(name, True, device, torch.float32)  # fp32 masters, bf16 autocast on CUDA
    c = CONFIGS[name]
    batch = 1 if torch.device(device).type == "cuda" else c["batch"]
    ids, pixels = inputs(ours.cfg, batch, c["train_len"] - ours.num_image_tokens, device, torch.float32)
    labels = ids.masked_fill(ids == ours.cfg.image_token_id, -100)
    steps = {}
    for who, model, vision in (("ours", ours, ours.vision_tower), ("transformers", theirs, theirs.model.vision_tower)):
        vision.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                fused=torch.device(device).type == "cuda")

        def step(model=model, opt=opt, who=who):
            with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(ids, pixel_values=pixels, labels=labels)[1] if who == "ours" else \
                    model(input_ids=ids, pixel_values=pixels, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[who] = step
    mem_ours, mem_theirs = {}, {}
    with peak_memory(device, mem_ours):
        steps["ours"]()
    with peak_memory(device, mem_theirs):
        steps["transformers"]()
    t_ours, t_theirs = timed(steps["ours"], device, warmup, repeats, steps["transformers"])
    tokens = ids.numel()
    row = {"row": "train step (tokens/s)", "ours": tokens / t_ours, "transformers": tokens / t_theirs,
           "peak_mb_ours": mem_ours["peak_mb"], "peak_mb_transformers": mem_theirs["peak_mb"],
           "shape": f"batch {batch} x {ids.shape[1]} tokens, vision frozen"}
    row["flash_ours"] = runs_on_flash(steps["ours"])
    peak = peak_flops(device)
    if peak:
        from .stages import llava_flops_per_token
        row["mfu_ours"] = llava_flops_per_token(ours, "2", ids.shape[1]) * row["ours"] / peak
    return row


def inference_rows(name, device, dtype, warmup, repeats) -> list:
    ours, theirs = build_pair(name, False, device, dtype)
    ours.eval(), theirs.eval()
    c = CONFIGS[name]
    ours.cfg.text.eos_token_id = -1  # never stop early: every run decodes exactly the asked tokens
    rows = []
    ids, pixels = inputs(ours.cfg, 1, c["prompt"], device, dtype)
    with torch.no_grad():
        mem = ({}, {})
        with peak_memory(device, mem[0]):
            ours(ids, pixel_values=pixels)
        with peak_memory(device, mem[1]):
            theirs(input_ids=ids, pixel_values=pixels, logits_to_keep=1)
        t = timed(lambda: ours.generate(ids, pixel_values=pixels, max_new_tokens=1), device, warmup, repeats,
                  lambda: theirs.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=1, do_sample=False,
                                          attention_mask=torch.ones_like(ids), pad_token_id=0))
        rows.append({"row": "prefill latency (ms)", "ours": 1e3 * t[0], "transformers": 1e3 * t[1],
                     "peak_mb_ours": mem[0]["peak_mb"], "peak_mb_transformers": mem[1]["peak_mb"],
                     "shape": f"1 image ({ours.num_image_tokens} tokens) + {c['prompt']}-token prompt",
                     "lower_is_better": True})
        for batch in (1, 8):
            rows.append(decode_row(ours, theirs, batch, c, device, dtype, warmup, repeats))
    return rows


def decode_row(ours, theirs, batch, c, device, dtype, warmup, repeats) -> dict:
    """Decode rate = extra tokens / extra time of an N+1-token generation over a 1-token one."""
    ids, pixels = inputs(ours.cfg, batch, c["prompt"], device, dtype)
    n = c["new_tokens"]
    gen_ours = lambda k: ours.generate(ids, pixel_values=pixels, max_new_tokens=k)  # noqa: E731
    gen_theirs = lambda k: theirs.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=k,  # noqa: E731
                                           min_new_tokens=k, do_sample=False, attention_mask=torch.ones_like(ids),
                                           pad_token_id=0)
    mem = ({}, {})
    with peak_memory(device, mem[0]):
        gen_ours(n + 1)
    with peak_memory(device, mem[1]):
        gen_theirs(n + 1)
    long = timed(lambda: gen_ours(n + 1), device, warmup, repeats, lambda: gen_theirs(n + 1))
    short = timed(lambda: gen_ours(1), device, warmup, repeats, lambda: gen_theirs(1))
    rate = [batch * n / max(1e-9, a - b) for a, b in zip(long, short)]
    row = {"row": f"decode batch {batch} (tokens/s)", "ours": rate[0], "transformers": rate[1],
           "peak_mb_ours": mem[0]["peak_mb"], "peak_mb_transformers": mem[1]["peak_mb"],
           "shape": f"{n} new tokens after 1 image + {c['prompt']} tokens"}
    bandwidth = next((v for k, v in BANDWIDTH.items() if torch.device(device).type == "cuda"
                      and k in torch.cuda.get_device_name(device)), None)
    if bandwidth:
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.language_model.parameters())
        row["gb_per_s_ours"] = weight_bytes * rate[0] / batch / 1e9
        row["roofline_share_ours"] = row["gb_per_s_ours"] * 1e9 / bandwidth
    return row


def table(rows: list) -> str:
    lines = ["| row | llava-min | transformers | ratio | peak MB (ours / theirs) | shape |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["transformers"] / r["ours"] if r.get("lower_is_better") else r["ours"] / r["transformers"]
        mem = f"{r['peak_mb_ours']} / {r['peak_mb_transformers']}" if r["peak_mb_ours"] is not None else "n/a (CPU)"
        extra = "".join(f", {k} {r[k]:.2f}" for k in ("mfu_ours", "gb_per_s_ours", "roofline_share_ours") if k in r)
        lines.append(f"| {r['row']} | {r['ours']:.1f} | {r['transformers']:.1f} | {ratio:.2f}x | {mem} | "
                     f"{r['shape']}{extra} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.config == "7b" and torch.device(args.device).type != "cuda":
        p.error("--config 7b needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    rows = [train_row(args.config, args.device, dtype, args.warmup, args.repeats)]
    rows += inference_rows(args.config, args.device, dtype, args.warmup, args.repeats)
    device = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "CPU"
    print(f"llava-min vs transformers, config {args.config}, {device}, {dtype}\n" + table(rows))
    flash = "yes" if rows[0]["flash_ours"] else "NO"
    note = "" if torch.device(args.device).type == "cuda" else " (CPU's flash kernel takes masks too: decisive on CUDA)"
    print(f"training-shaped attention runs on the flash SDPA backend: {flash}{note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "device": device, "dtype": str(dtype), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
