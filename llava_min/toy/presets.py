"""The toy presets: the synthetic world, the tiny CLIP and LLaMA that stand in for the real ones, how they
are pretrained, and LLaVA's recipe for stages 1 and 2 on them."""
import dataclasses
from dataclasses import dataclass

from ..model.clip import VisionConfig
from ..model.llama import LlamaConfig
from ..train.recipes import Preset, StageSettings


@dataclass
class ToyPreset:
    recipe: Preset  # stages 1 and 2, as a real recipe says them
    num_images: int  # the world: training images
    num_eval: int  # held-out images
    vocab_size: int  # the tokenizer trained on the world's text
    vision: VisionConfig  # the toy CLIP
    clip_text: LlamaConfig  # its text tower, for the contrastive pretraining
    text: LlamaConfig  # the toy LLM
    clip: StageSettings  # CLIP's contrastive pretraining
    lm: StageSettings  # the LLM's next-token pretraining
    lm_seq_len: int = 128
    clip_decorrelation: float = 0.0  # weight of the toy CLIP's decorrelation term (toy/contrastive.py)
    whiten_features: bool = True  # stages 1 and 2: the projector trained in whitened coordinates (toy/whiten.py)
    lm_sees_answer_formats: bool = True  # False: the LM pretrains without the short-answer and multiple-choice chats


TOY_PRESETS = {
    # The synthetic world on a laptop CPU: a 96 px CLIP with 32 px patches (9 visual tokens), a ~1M-parameter LLaMA.
    "toy": ToyPreset(
        recipe=Preset(stage1=StageSettings(lr=1e-3, epochs=1, batch_size=32),
                      stage2=StageSettings(lr=1e-3, epochs=6, batch_size=32),  # run time: docs/toy.md
                      image_aspect="crop", max_length=256, group_by_length=True),
        num_images=8000, num_eval=500, vocab_size=1024,
        vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                            image_size=96, patch_size=32),
        clip_text=LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
        text=LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        clip=StageSettings(lr=1e-3, epochs=2, batch_size=128),
        lm=StageSettings(lr=2e-3, epochs=0.5, batch_size=32)),
    # The same pipeline at a size that runs in seconds: tests and CI's smoke run.
    "smoke": ToyPreset(
        recipe=Preset(stage1=StageSettings(lr=1e-3, batch_size=4), stage2=StageSettings(lr=1e-3, batch_size=4),
                      image_aspect="crop", max_length=512, group_by_length=True),
        num_images=48, num_eval=12, vocab_size=400,
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8),
        clip_text=LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128),
        text=LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
        clip=StageSettings(lr=1e-3, batch_size=8), lm=StageSettings(lr=1e-3, batch_size=8), lm_seq_len=64),
}
# Bigger where the research says the toy is short (docs/research/toy-research.md): twice the world, an LLM of
# width 256 with 8 heads, an LM that never learned to guess the answer formats blind; run time: docs/toy.md.
TOY_PRESETS["toy-large"] = dataclasses.replace(
    TOY_PRESETS["toy"], num_images=2 * TOY_PRESETS["toy"].num_images,
    text=dataclasses.replace(TOY_PRESETS["toy"].text, hidden_size=256, intermediate_size=704, num_attention_heads=8,
                             num_key_value_heads=4),
    lm=dataclasses.replace(TOY_PRESETS["toy"].lm, epochs=1.0), lm_sees_answer_formats=False)
# toy-large's changes to the toy, made to smoke: what the tests run of it.
TOY_PRESETS["smoke-large"] = dataclasses.replace(
    TOY_PRESETS["smoke"], num_images=2 * TOY_PRESETS["smoke"].num_images,
    text=dataclasses.replace(TOY_PRESETS["smoke"].text, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2),
    lm=dataclasses.replace(TOY_PRESETS["smoke"].lm, epochs=2.0), lm_sees_answer_formats=False)
