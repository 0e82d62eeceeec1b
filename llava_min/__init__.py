"""llava-min: a minimal, readable LLaVA / LLaVA-1.5 in PyTorch."""
from .checkpoints import build_llava, load, load_llama, load_vision, save_llava
from .clip import VisionConfig, VisionTower
from .conversation import render_prompt, tokenize_conversation, tokenize_prompt
from .llama import Llama, LlamaConfig
from .llava import Llava, LlavaConfig
from .projector import Projector
from .tokenizer import Tokenizer
from .weights import CheckpointError

__all__ = ["load", "load_vision", "load_llama", "build_llava", "save_llava", "Llava", "LlavaConfig", "Llama",
           "LlamaConfig", "VisionTower", "VisionConfig", "Projector", "CheckpointError", "Tokenizer",
           "tokenize_conversation", "tokenize_prompt", "render_prompt"]
