"""The toy presets: the synthetic world and the tiny CLIP and LLaMA that stand in for the real ones."""
from ..model.clip import VisionConfig
from ..model.llama import LlamaConfig
from ..train.recipes import Preset, StageSettings

TOY_PRESETS = {
    # The synthetic world on a laptop CPU: a 96 px CLIP with 32 px patches (9 visual tokens), a ~1M-parameter LLaMA.
    "toy": Preset(
        stage1=StageSettings(lr=1e-3, epochs=1, batch_size=32),
        stage2=StageSettings(lr=1e-3, epochs=6, batch_size=32),  # run time: docs/toy.md
        image_aspect="crop", max_length=256, num_images=8000, num_eval=500, vocab_size=1024, whiten_features=True,
        group_by_length=True,
        vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                            image_size=96, patch_size=32),
        text=LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        clip_text=LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
        clip=StageSettings(lr=1e-3, epochs=2, batch_size=128),
        lm=StageSettings(lr=2e-3, epochs=0.5, batch_size=32)),
    # The same pipeline at a size that runs in seconds: tests and CI's smoke run.
    "smoke": Preset(
        stage1=StageSettings(lr=1e-3, batch_size=4), stage2=StageSettings(lr=1e-3, batch_size=4),
        image_aspect="crop", max_length=512, num_images=48, num_eval=12, vocab_size=400, whiten_features=True,
        group_by_length=True,
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8),
        text=LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
        clip_text=LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128),
        clip=StageSettings(lr=1e-3, batch_size=8), lm=StageSettings(lr=1e-3, batch_size=8), lm_seq_len=64),
}
