"""Speed and memory of llava-min against transformers' LlavaForConditionalGeneration (SDPA attention).

Both models get the same config and the same weights, run in one process, alternating, after warm-up,
with `synchronize()` around every GPU timing; each figure is the median of the repeats.

    python -m llava_min.tools.bench --config tiny            # anywhere (CI runs it)
    python -m llava_min.tools.bench --config 7b --out bench.json   # CUDA: ViT-L/14-336 + a 7B LLaMA (bf16); 1B for training

On CUDA it adds the compiled rows (`--rows` picks rows; compiling takes a minute or two per shape):
both language models under `torch.compile` for training, and ours decoding through the compiled,
CUDA-graphed step for decode (transformers' figure there is its plain `generate`, from the row above).
"""
import argparse
import json
import time
import traceback

import torch

from ..checkpoint.load import build_on_meta
from ..checkpoint.names import LLAVA_HF, TRANSFORMERS, ignore_reason, reader
from ..model.clip import VisionConfig
from ..model.llama import LlamaConfig
from ..train.devices import peak_flops
from ..model.llava import Llava, LlavaConfig
from ..checkpoint.weights import load_strict
from .timing import free_memory, peak_memory, runs_on_flash, timed

ROWS = ("train", "train-compiled", "prefill", "decode", "decode-compiled")
START = time.perf_counter()

# HBM bandwidth (bytes/s) for the decode roofline, keyed by a substring of the device name.
# HBM bandwidth by a substring of torch.cuda.get_device_name(), the more specific names first
BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12,
             "A100 80GB PCIe": 1.935e12, "A100": 1.555e12}

VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14)
CONFIGS = {
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             image_size=56, patch_size=14),
                 text=dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2), train_text=None,
                 prompt=100, new_tokens=32, train_len=128, train_batch=4),
    "7b": dict(vision=VIT_L_336, text=dict(vocab_size=32064), train_text=dict(
                   vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4),  # a 1.1B LLaMA (TinyLlama's shape)
               prompt=100, new_tokens=128, train_len=2048, train_batch=8),
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
    load_strict(ours, tensors, reader(TRANSFORMERS, LLAVA_HF), ignore_reason, dtype, device)
    return ours, theirs


def inputs(cfg: LlavaConfig, batch: int, text_len: int, device, dtype):
    g = torch.Generator().manual_seed(1)
    n_img = cfg.vision.num_patches
    text = torch.randint(3, cfg.text.vocab_size - 64, (batch, text_len), generator=g)
    ids = torch.cat([text[:, :1], torch.full((batch, n_img), cfg.image_token_id), text[:, 1:]], dim=1).to(device)
    pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g).to(device, dtype)
    return ids, pixels


def train_row(name, device, dtype, warmup, repeats, compile=False, batch=None) -> dict:
    """One stage-2 step (vision frozen, projector + LLM trained): fp32 masters, bf16 autocast on CUDA.
    `compile`: both language models go through `torch.compile` (the rest stays eager)."""
    ours, theirs = build_pair(name, True, device, torch.float32)
    c = CONFIGS[name]
    batch = batch or c["train_batch"]
    ids, pixels = inputs(ours.cfg, batch, c["train_len"] - ours.num_image_tokens, device, torch.float32)
    if compile:
        ours.language_model.compile(), theirs.model.language_model.compile(), theirs.lm_head.compile()
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
    row = {"row": "train step, both LLMs compiled (tokens/s)" if compile else "train step (tokens/s)",
           "ours": tokens / t_ours, "transformers": tokens / t_theirs,
           "peak_mb_ours": mem_ours["peak_mb"], "peak_mb_transformers": mem_theirs["peak_mb"],
           "shape": f"batch {batch} x {ids.shape[1]} tokens, vision frozen"}
    row["flash_ours"] = runs_on_flash(steps["ours"])
    peak = peak_flops(device)
    if peak:
        from ..train.flops import llava_flops_per_token
        flops = llava_flops_per_token(ours, ids.shape[1])
        row["mfu_ours"], row["mfu_transformers"] = flops * row["ours"] / peak, flops * row["transformers"] / peak
    return row


def inference_rows(name, device, dtype, warmup, repeats, wanted=("prefill", "decode"), batches=(1, 8)) -> list:
    ours, theirs = build_pair(name, False, device, dtype)
    ours.eval(), theirs.eval()
    c = CONFIGS[name]
    ours.cfg.text.eos_token_id = -1  # never stop early: every run decodes exactly the asked tokens
    rows = []
    with torch.no_grad():
        if "prefill" in wanted:
            rows.append(report(guarded("prefill", prefill_row, ours, theirs, c, device, dtype, warmup, repeats)))
        eager = {}
        for compiled in (False, True):
            if ("decode-compiled" if compiled else "decode") not in wanted:
                continue
            for batch in batches:
                row = guarded(f"decode batch {batch}{' compiled' if compiled else ''}", decode_row, ours, theirs,
                              batch, c, device, dtype, warmup, repeats, compiled, eager.get(batch))
                eager.setdefault(batch, row)
                rows.append(report(row))
    return rows


def prefill_row(ours, theirs, c, device, dtype, warmup, repeats) -> dict:
    ids, pixels = inputs(ours.cfg, 1, c["prompt"], device, dtype)
    mem = ({}, {})
    with peak_memory(device, mem[0]):
        ours(ids, pixel_values=pixels)
    with peak_memory(device, mem[1]):
        theirs(input_ids=ids, pixel_values=pixels, logits_to_keep=1)
    t = timed(lambda: ours.generate(ids, pixel_values=pixels, max_new_tokens=1), device, warmup, repeats,
              lambda: theirs.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=1, do_sample=False,
                                      attention_mask=torch.ones_like(ids), pad_token_id=0))
    return {"row": "prefill latency (ms)", "ours": 1e3 * t[0], "transformers": 1e3 * t[1],
            "peak_mb_ours": mem[0]["peak_mb"], "peak_mb_transformers": mem[1]["peak_mb"],
            "shape": f"1 image ({ours.num_image_tokens} tokens) + {c['prompt']}-token prompt", "lower_is_better": True}


def decode_row(ours, theirs, batch, c, device, dtype, warmup, repeats, compile=False, reference=None) -> dict:
    """Decode rate = extra tokens / extra time of an N+1-token generation over a 1-token one.
    `compile`: ours decodes through the compiled step (a CUDA graph on GPU); transformers as it comes,
    its figures taken from the `reference` row (the same workload, timed just before) when given."""
    ids, pixels = inputs(ours.cfg, batch, c["prompt"], device, dtype)
    n = c["new_tokens"]
    gen_ours = lambda k: ours.generate(ids, pixel_values=pixels, max_new_tokens=k, compile=compile)  # noqa: E731
    gen_theirs = lambda k: theirs.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=k,  # noqa: E731
                                           min_new_tokens=k, do_sample=False, attention_mask=torch.ones_like(ids),
                                           pad_token_id=0)
    theirs_timed = reference is None or "error" in reference
    mem = ({}, {"peak_mb": None if theirs_timed else reference["peak_mb_transformers"]})
    with peak_memory(device, mem[0]):
        gen_ours(n + 1)
    if theirs_timed:
        with peak_memory(device, mem[1]):
            gen_theirs(n + 1)
    long = timed(lambda: gen_ours(n + 1), device, warmup, repeats, (lambda: gen_theirs(n + 1)) if theirs_timed else None)
    short = timed(lambda: gen_ours(1), device, warmup, repeats, (lambda: gen_theirs(1)) if theirs_timed else None)
    rate = [batch * n / max(1e-9, long[0] - short[0]),
            batch * n / max(1e-9, long[1] - short[1]) if theirs_timed else reference["transformers"]]
    label = f"decode batch {batch}, ours compiled (tokens/s)" if compile else f"decode batch {batch} (tokens/s)"
    row = {"row": label, "ours": rate[0], "transformers": rate[1],
           "peak_mb_ours": mem[0]["peak_mb"], "peak_mb_transformers": mem[1]["peak_mb"],
           "shape": f"{n} new tokens after 1 image + {c['prompt']} tokens"}
    bandwidth = next((v for k, v in BANDWIDTH.items() if torch.device(device).type == "cuda"
                      and k in torch.cuda.get_device_name(device)), None)
    if bandwidth:
        row["gb_per_s_ours"] = decode_bytes(ours) * rate[0] / batch / 1e9
        row["roofline_share_ours"] = row["gb_per_s_ours"] * 1e9 / bandwidth
    return row


def decode_bytes(model) -> int:
    """Weight bytes one decode step must read: every LLM weight but the embedding table (a row each)."""
    llm = model.language_model
    return sum(p.numel() * p.element_size() for p in llm.parameters()) - \
        (0 if llm.cfg.tie_word_embeddings else llm.embed_tokens.weight.numel() * llm.embed_tokens.weight.element_size())


def report(row: dict) -> dict:
    """Prints each row as it is measured (a 7B run takes minutes), with the time since start."""
    print(f"[{time.perf_counter() - START:.0f}s] {json.dumps(row)}", flush=True)
    return row


def guarded(label: str, fn, *args) -> dict:
    """A row, or (printed with its traceback) a row that names the error: one failure loses one row."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the table and in the exit status
        traceback.print_exc()
        return {"row": label, "error": f"{type(e).__name__}: {e}"[:300]}


def table(rows: list) -> str:
    lines = ["| row | llava-min | transformers | ratio | peak MB over resident (ours / theirs) | shape |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} | | | | |")
            continue
        ratio = r["transformers"] / r["ours"] if r.get("lower_is_better") else r["ours"] / r["transformers"]
        mem = f"{r['peak_mb_ours']} / {r['peak_mb_transformers']}" if r["peak_mb_ours"] is not None else "n/a (CPU)"
        extra = "".join(f", {k} {r[k]:.2f}" for k in ("mfu_ours", "mfu_transformers", "gb_per_s_ours",
                                                      "roofline_share_ours") if k in r)
        lines.append(f"| {r['row']} | {r['ours']:.1f} | {r['transformers']:.1f} | {ratio:.2f}x | {mem} | "
                     f"{r['shape']}{extra} |")
    return "\n".join(lines)


def main(argv=None):
    from ..cli import default_device, device, positive, writable
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--device", type=device, default=default_device(), help="default: cuda where there is one")
    p.add_argument("--warmup", type=positive(zero_ok=True), default=2)
    p.add_argument("--repeats", type=positive(), default=5)
    p.add_argument("--out", type=writable(), help="write the rows as JSON here")
    p.add_argument("--rows", nargs="+", choices=ROWS, help="default: all; on CPU all but the compiled ones "
                   "(compiling takes minutes there)")
    p.add_argument("--train-batch", type=positive(), help="sequences per training step (default: the config's)")
    p.add_argument("--batches", type=positive(), nargs="+", default=[1, 8], help="decode batch sizes")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if args.config == "7b" and not cuda:
        p.error("--config 7b needs CUDA")
    wanted = args.rows or [r for r in ROWS if cuda or not r.endswith("compiled")]
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for compiled in (False, True):
        if ("train-compiled" if compiled else "train") in wanted:
            rows.append(report(guarded(f"train step{' compiled' if compiled else ''}", train_row, args.config,
                                       args.device, dtype, args.warmup, args.repeats, compiled, args.train_batch)))
            free_memory(args.device)
    if {"prefill", "decode", "decode-compiled"} & set(wanted):
        rows += inference_rows(args.config, args.device, dtype, args.warmup, args.repeats, wanted, args.batches)
    device = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    print(f"llava-min vs transformers, config {args.config}, {device}, {dtype}, torch {torch.__version__}\n"
          + table(rows))
    if rows and "flash_ours" in rows[0]:
        flash = "yes" if rows[0]["flash_ours"] else "NO"
        note = "" if cuda else " (CPU's flash kernel takes masks too: decisive on CUDA)"
        print(f"training-shaped attention runs on the flash SDPA backend: {flash}{note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "device": device, "dtype": str(dtype), "torch": torch.__version__,
                       "rows": rows}, f, indent=2)
    if any("error" in r for r in rows):
        raise SystemExit("some rows failed (tracebacks above)")


if __name__ == "__main__":
    from ..cli import run
    run(main)
