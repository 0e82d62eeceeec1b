import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The real LLaMA tokenizer lives beside the checkout for developers; users' checkouts lack it.
LLAMA_TOKENIZER = Path(os.environ.get("LLAMA_TOKENIZER", ROOT.parent / "shared/fixtures/llama2-tokenizer.model"))


@pytest.fixture(scope="session")
def llama_tokenizer_path():
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip(f"real LLaMA tokenizer not found at {LLAMA_TOKENIZER}")
    return LLAMA_TOKENIZER


# ---------------------------------------------------------------- tiny random reference checkpoints
# Written by transformers' save_pretrained, so the tests read the real on-disk format.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   image_size=28, patch_size=7, projection_dim=16, layer_norm_eps=1e-5)
TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
IMAGE_TOKEN = 120


def hf_llava_config(**text_overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    return LlavaConfig(vision_config=CLIPVisionConfig(**TINY_VISION),
                       text_config=LlamaConfig(**{**TINY_TEXT, **text_overrides}), image_token_index=IMAGE_TOKEN,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def hf_reference(cls, path):
    """A transformers model loaded the bit-faithful way: fp32, eager attention."""
    import torch
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def nontrivial(model):
    """A fresh model's norms are all 1 and its biases all 0, which hides a swapped norm or a dropped bias:
    perturb them (in place, from the seeded RNG) before saving."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_llava_dir(tmp_path_factory):
    import torch
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf_llava")
    nontrivial(LlavaForConditionalGeneration(hf_llava_config())).save_pretrained(path)
    return path


NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]  # LLaVA-NeXT's grids at the tiny 28-px tile


@pytest.fixture(scope="session")
def hf_next_dir(tmp_path_factory):
    """A tiny random LLaVA-NeXT (llava-hf LlavaNext: AnyRes tiles and a row-end vector)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    torch.manual_seed(6)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**TINY_VISION),
                          text_config=LlamaConfig(**{**TINY_TEXT, "max_position_embeddings": 512}),
                          image_token_index=IMAGE_TOKEN, image_grid_pinpoints=NEXT_PINPOINTS)
    path = tmp_path_factory.mktemp("hf_next")
    nontrivial(LlavaNextForConditionalGeneration(cfg)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory):
    """A full CLIPModel (vision + text towers), as openai/clip-vit-large-patch14 ships."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("hf_clip")
    cfg = CLIPConfig(text_config=CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, projection_dim=16).to_dict(),
                     vision_config=CLIPVisionConfig(**TINY_VISION).to_dict(), projection_dim=16)
    nontrivial(CLIPModel(cfg)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("hf_llama")
    nontrivial(LlamaForCausalLM(LlamaConfig(**{**TINY_TEXT, "rope_theta": 500.0}))).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small LLaMA-style tokenizer trained on toy text: what the toy pipeline uses, no download."""
    from llava_min.tokenizer import train_tokenizer
    path = tmp_path_factory.mktemp("tiny_tok")
    lines = [f"A {c} {s} at the {p}. How many {s}s are there? There are {n} objects."
             for c in ("red", "green", "blue") for s in ("circle", "square") for p in ("top", "left") for n in range(5)]
    (path / "corpus.txt").write_text("\n".join(lines * 20))
    train_tokenizer(path / "corpus.txt", path / "tok.model", vocab_size=300)
    return path / "tok.model"


CHAT_IMAGE_TOKEN = 440


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, tiny_tokenizer):
    """A tiny random llava-hf checkpoint whose vocabulary fits the tiny tokenizer, with tokenizer.model."""
    import shutil

    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("chat_model")
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**TINY_VISION),
                      text_config=LlamaConfig(**{**TINY_TEXT, "vocab_size": 448}), image_token_index=CHAT_IMAGE_TOKEN)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    shutil.copy(tiny_tokenizer, path / "tokenizer.model")
    for name, seed in (("cat.png", 0), ("dog.png", 1)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path / name)
    return path


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """A tiny world, its tokenizer, and a contrastive CLIP and an LM pretrained for a few steps."""
    import train
    from llava_min.toy.build import build_world
    from llava_min.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("smoke")
    data = root / "data"
    build_world(data, num_images=48, num_eval=12, seed=0, image_size=32, workers=1)
    train.main(["--stage", "tokenizer", "--preset", "smoke", "--data", str(data / "corpus.txt"),
                "--out", str(root / "tokenizer.model")])
    assert Tokenizer(root / "tokenizer.model").vocab_size == 400
    common = ["--preset", "smoke", "--tokenizer", str(root / "tokenizer.model"), "--image-folder", str(data / "images"),
              "--max-steps", "3", "--no-progress"]
    train.main(["--stage", "clip", "--data", str(data / "pretrain.json"), "--out", str(root / "clip")] + common)
    train.main(["--stage", "lm", "--data", str(data / "corpus.txt"), "--out", str(root / "lm")] + common)
    return root


@pytest.fixture
def running():
    """A live process that is not the one under test: the holder of a lock (its pid)."""
    import subprocess
    import sys
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield process.pid
    process.kill()
    process.wait()
