"""Checks that need a GPU (skipped without one; run them on a CUDA machine): the reference parity on
CUDA kernels, the compiled decode step captured as a CUDA graph, and flash attention in training."""
import pytest
import torch

import llava_min
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
