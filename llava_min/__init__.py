"""llava-min: a minimal, readable LLaVA / LLaVA-1.5 in PyTorch.

The paper's model (Fig. 1) is in llava_min/model/: clip.py (g), projector.py (W, Eq. 1), llama.py
(f_phi, Eq. 3), llava.py (the splice). Around it: text (tokenizer, conversation), images, data,
training (stages, trainer), checkpoints, evaluation. The toy world (llava_min/toy/) and the tools
(llava_min/tools/) use the method; the method never imports them.
"""
from .checkpoint.peft import load_adapted
from .checkpoint.load import build_llava, load, load_llama, load_vision
from .conversation import render_prompt, tokenize_conversation, tokenize_prompt
from .model.clip import VisionConfig, VisionTower
from .model.llama import Llama, LlamaConfig
from .model.llava import Llava, LlavaConfig
from .model.projector import Projector
from .checkpoint.save import save_llava
from .tokenizer import Tokenizer
from .checkpoint.weights import CheckpointError

__all__ = ["load", "load_adapted", "load_vision", "load_llama", "build_llava", "save_llava", "Llava", "LlavaConfig",
           "Llama", "LlamaConfig", "VisionTower", "VisionConfig", "Projector", "CheckpointError", "Tokenizer",
           "tokenize_conversation", "tokenize_prompt", "render_prompt"]
