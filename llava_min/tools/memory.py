"""Peak GPU memory of training, computed from the shapes (no GPU needed): why stage 2 of a 7B model
needs LoRA on one 80 GB card.

    python -m llava_min.tools.memory                    # LLaVA-1.5-7B shapes, sequence 2048, micro-batch 1

Counted in bytes: frozen weights in bf16 (2/param); trained weights as fp32 masters + fp32 gradients +
two AdamW moments (16/param); activations kept for the backward pass in bf16, per token and layer,
for LLaMA's blocks with a fused (flash) attention kernel, so no T x T term; the logits in fp32 for the
loss. With gradient checkpointing only each block's input is kept, plus one block being recomputed.
The vision tower is frozen and nothing flows back into it, so it keeps no activations.
"""
import argparse
from dataclasses import dataclass

from ..model.clip import VisionConfig
from ..model.llama import LlamaConfig

GB = 1e9
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class Estimate:
    weights: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.optimizer + self.activations + self.logits


def llm_params(c: LlamaConfig) -> int:
    d, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * i + 2 * d
    return c.num_hidden_layers * per_layer + 2 * c.vocab_size * d + d


def vision_params(c: VisionConfig) -> int:
    d = c.hidden_size
    i = c.intermediate_size
    return c.num_hidden_layers * (4 * d * d + 2 * d * i + 9 * d + i) + (c.num_patches + 2) * d + \
        3 * c.patch_size ** 2 * d + 4 * d


def lora_params(c: LlamaConfig, r: int) -> int:
    d, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]
    return c.num_hidden_layers * sum(r * (a + b) for a, b in shapes)


def activation_bytes_per_token_layer(c: LlamaConfig, lora_r: int = 0) -> int:
    """What one LLaMA block saves for backward, per token (bf16 unless noted)."""
    d, i = c.hidden_size, c.intermediate_size
    norms = 2 * (4 * d + 2 * d)  # two RMSNorms: fp32 input copy + output
    attention = 2 * (3 * d) + 2 * (2 * d) + 2 * d  # q, k, v; rotated q, k; attention output
    mlp = 2 * 4 * i  # gate, up, silu(gate), product
    # each adapter saves its input's dropout mask (bf16) and fp32 copy, and its rank-r intermediate (fp32);
    # q, k, v, o, gate and up read d values, down reads i (measured with saved_tensors_hooks)
    lora = (6 * (6 * d + i) + 4 * 7 * lora_r) if lora_r else 0
    return norms + attention + mlp + lora


def estimate(text: LlamaConfig, vision: VisionConfig, mode: str, seq_len=2048, micro_batch=1, checkpointing=True,
             lora_r=128, projector_params=None) -> Estimate:
    """mode: "stage1" (projector trained), "stage2" (projector + LLM), "stage2-lora" (projector + adapters)."""
    n_llm, n_vision = llm_params(text), vision_params(vision)
    n_proj = projector_params or vision.hidden_size * text.hidden_size + text.hidden_size ** 2 + 2 * text.hidden_size
    trained = n_proj + {"stage1": 0, "stage2": n_llm, "stage2-lora": lora_params(text, lora_r)}[mode]
    frozen_llm = 0 if mode == "stage2" else n_llm
    weights = 2 * (n_vision + frozen_llm) + 4 * trained
    optimizer = 12 * trained  # fp32 gradient + AdamW's two moments
    tokens = seq_len * micro_batch
    per_layer = activation_bytes_per_token_layer(text, lora_r if mode == "stage2-lora" else 0) * tokens
    if checkpointing:
        activations = text.num_hidden_layers * 2 * text.hidden_size * tokens + per_layer
    else:
        activations = text.num_hidden_layers * per_layer
    logits = tokens * text.vocab_size * (2 + 4 + 4)  # bf16 logits, fp32 copy for the loss, its gradient
    return Estimate(weights / GB, optimizer / GB, activations / GB, logits / GB)


def table(seq_len=2048, micro_batch=1) -> str:
    text, vision = LlamaConfig(vocab_size=32064), VisionConfig()
    lines = ["| stage / mode | checkpointing | weights | grads + AdamW | activations | logits | total (GB) | one 80 GB GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in ("stage1", "stage2", "stage2-lora"):
        for ckpt in (True, False):
            e = estimate(text, vision, mode, seq_len, micro_batch, ckpt)
            fits = "fits" if e.total < 78 else "does not fit"
            lines.append(f"| {mode} | {'on' if ckpt else 'off'} | {e.weights:.1f} | {e.optimizer:.1f} | "
                         f"{e.activations:.1f} | {e.logits:.1f} | {e.total:.1f} | {fits} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    args = p.parse_args(argv)
    if args.seq_len < 1 or args.micro_batch < 1:
        p.error(f"--seq-len and --micro-batch must be at least 1, got {args.seq_len} and {args.micro_batch}")
    print(f"computed peak memory, LLaVA-1.5-7B shapes, sequence {args.seq_len}, micro-batch {args.micro_batch}:")
    print(table(args.seq_len, args.micro_batch))


if __name__ == "__main__":
    from ..cli import run
    run(main)
