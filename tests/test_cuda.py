"""Checks that need a GPU (skipped without one; run them on a CUDA machine): the reference parity on
CUDA kernels, the compiled decode step captured as a CUDA graph, flash attention in training, and
train.py's CUDA-only paths (the GPU's RNG in resume snapshots, frozen parts in bf16 beside fp32 masters)."""
import json

import pytest
import torch

import llava_min
import train
from conftest import hf_reference
from test_model import image_prompt, pixels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32: no TF32 in matrix products or convolutions (the patch embedding)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_logits_match_transformers_on_cuda(hf_llava_dir):
    from transformers import LlavaForConditionalGeneration
    ref = hf_reference(LlavaForConditionalGeneration, hf_llava_dir).cuda()
    ours = llava_min.load(hf_llava_dir, dtype=torch.float32, device="cuda")
    ids, x = image_prompt(16, batch=2, text_after=9).cuda(), pixels(2).cuda()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=x)[0], ref(input_ids=ids, pixel_values=x).logits,
                                   atol=1e-4, rtol=1e-4)


def test_compiled_decoding_gives_the_eager_tokens(hf_llava_dir):
    """torch.compile(mode="reduce-overhead"): the step replays as a CUDA graph writing the cache in place."""
    ours = llava_min.load(hf_llava_dir, dtype=torch.float32, device="cuda")
    ours.cfg.text.eos_token_id = -1  # decode every asked token
    ids, x = image_prompt(16, seed=6, text_after=5).cuda(), pixels(2, seed=7).cuda()
    ids = ids.expand(2, -1)
    eager = ours.generate(ids, pixel_values=x, max_new_tokens=40)
    for batch in (2, 2, 1):
        got = ours.generate(ids[:batch], pixel_values=x[:batch], max_new_tokens=40, compile=True)
        assert got.tolist() == eager[:batch].tolist()


def test_compiled_decoding_stops_where_eager_decoding_stops(hf_llava_dir):
    """A `stop` (a template's text end marker) makes the compiled loop look at every token, not every 16th."""
    ours = llava_min.load(hf_llava_dir, dtype=torch.float32, device="cuda")
    ours.cfg.text.eos_token_id = -1
    ids, x = image_prompt(16, seed=6, text_after=5).cuda(), pixels(1, seed=7).cuda()
    stop = lambda row: len(row) >= 5  # noqa: E731
    eager = ours.generate(ids, pixel_values=x, max_new_tokens=40, stop=stop)
    compiled = ours.generate(ids, pixel_values=x, max_new_tokens=40, stop=stop, compile=True)
    assert eager.shape[1] == 5 and compiled.tolist() == eager.tolist()


def stage2_args(parts, out, *extra):
    return ["--stage", "2", "--preset", "smoke", "--vision", str(parts / "clip"), "--llm", str(parts / "lm"),
            "--tokenizer", str(parts / "tokenizer.model"), "--data", str(parts / "data" / "instruct.json"),
            "--image-folder", str(parts / "data" / "images"), "--batch-size", "4", "--max-steps", "4",
            "--no-progress", "--device", "cuda", "--out", str(out), *extra]


def test_resume_restores_the_gpus_dropout_masks(parts, tmp_path):
    """LoRA dropout draws on the GPU's generator: a resumed run must draw the masks the whole run drew.
    SDPA's math kernel: the fused kernels' backward may add in any order, which would blur the check."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    lora = ["--lora", "--lora-r", "4", "--lora-dropout", "0.3"]
    with sdpa_kernel(SDPBackend.MATH):
        train.main(stage2_args(parts, tmp_path / "whole", *lora))
        train.main(stage2_args(parts, tmp_path / "parts", *lora, "--stop-after", "2"))
        assert "cuda" in torch.load(tmp_path / "parts" / "resume" / "state.pt", weights_only=True)["rng"][0]
        train.main(stage2_args(parts, tmp_path / "parts", *lora, "--resume"))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("whole", "parts")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_anyres_row_end_vector_trains_in_fp32_beside_a_bf16_vision_tower(parts, tmp_path, monkeypatch):
    seen = {}

    def master_weights(model, stage, lora):
        original(model, stage, lora)
        seen.update(model=model, start=model.image_newline.detach().clone())
    original = train.master_weights
    monkeypatch.setattr(train, "master_weights", master_weights)
    train.main(stage2_args(parts, tmp_path / "next", "--anyres", "--lr", "1e-3"))
    model = seen["model"]
    assert {p.dtype for p in model.vision_tower.parameters()} == {torch.bfloat16}
    assert model.image_newline.dtype == torch.float32 and not torch.equal(model.image_newline, seen["start"])
    saved = llava_min.load(tmp_path / "next")
    torch.testing.assert_close(saved.image_newline, model.image_newline.cpu())


def test_training_attention_runs_on_the_flash_kernel():
    """bf16, causal, grouped-query, no mask tensor: the flash backend alone must run forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    cfg = llava_min.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)
    model = llava_min.Llama(cfg).cuda()
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", torch.bfloat16):
        _, loss = model(ids, labels=ids)
    loss.backward()
    assert torch.isfinite(loss) and model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
