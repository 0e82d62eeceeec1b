"""LoRA: starts as the base model, trains only adapters (+ projector), merges to the same function."""
import pytest
import torch

import llava_min
from llava_min.model.low_rank import LoRAConfig, add_lora, merge_lora
from llava_min.checkpoint.peft import load_adapter
from llava_min.checkpoint.save import adapter_state, save_adapter
from llava_min.train.stages import freeze_for_stage
from test_model import image_prompt, pixels

CFG = LoRAConfig(r=4, alpha=8.0, dropout=0.0)


def batch():
    ids, x = image_prompt(16, batch=2), pixels(2)
    return ids, x, ids.masked_fill(ids >= 100, -100)


def test_lora_at_init_changes_nothing(hf_llava_dir):
    model = llava_min.load(hf_llava_dir)
    ids, x, _ = batch()
    before = model(ids, pixel_values=x)[0]
    add_lora(model.language_model, CFG)
    torch.testing.assert_close(model(ids, pixel_values=x)[0], before, atol=0, rtol=0)


def train_a_few_steps(model, steps=3):
    groups = freeze_for_stage(model, "2", lr=1e-2, lora=CFG)
    opt = torch.optim.AdamW(groups)
    ids, x, labels = batch()
    for _ in range(steps):
        model(ids, pixel_values=x, labels=labels)[1].backward()
        opt.step()
        opt.zero_grad()


def test_only_lora_and_projector_change(hf_llava_dir):
    model = llava_min.load(hf_llava_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_a_few_steps(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed)  # the base weights are untouched
    lora = [k for k in after if ".lora_B" in k]
    assert len(lora) == 2 * 7 and all(after[k].abs().sum() > 0 for k in lora)  # every adapter moved


def test_an_adapted_layer_is_w_plus_alpha_over_r_b_a():
    """LoRA written out: h = W x + (alpha / r) B A x."""
    from llava_min.model.low_rank import LoRALinear
    base = torch.nn.Linear(12, 8)
    layer = LoRALinear(base, CFG).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    expected = x @ base.weight.T + base.bias + (8.0 / 4) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merged_weights_give_the_same_logits(hf_llava_dir, tmp_path):
    """Tolerance 1e-5 (fp32): merging only reorders the sum W x + s B A x."""
    from transformers import LlavaForConditionalGeneration
    from conftest import hf_reference
    model = llava_min.load(hf_llava_dir)
    train_a_few_steps(model)
    model.eval()
    ids, x, _ = batch()
    with torch.no_grad():
        expected = model(ids, pixel_values=x)[0]
        merge_lora(model.language_model)
        assert not any(".lora_" in k for k in model.state_dict())
        torch.testing.assert_close(model(ids, pixel_values=x)[0], expected, atol=1e-5, rtol=1e-5)
    llava_min.save_llava(model, tmp_path / "merged")
    with torch.no_grad():
        theirs = hf_reference(LlavaForConditionalGeneration, tmp_path / "merged")(input_ids=ids, pixel_values=x).logits
        torch.testing.assert_close(llava_min.load(tmp_path / "merged")(ids, pixel_values=x)[0], expected, atol=1e-5,
                                   rtol=1e-5)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)


def test_adapter_saves_alone_and_loads_on_the_base(hf_llava_dir, tmp_path):
    model = llava_min.load(hf_llava_dir)
    train_a_few_steps(model)
    save_adapter(model, tmp_path / "adapter", base=hf_llava_dir)
    saved = set(adapter_state(model))
    assert saved and all(".lora_" in k or k.startswith("projector.") for k in saved)
    again = llava_min.load(hf_llava_dir)
    load_adapter(again, tmp_path / "adapter")
    assert not any(m.training for m in again.modules())  # loaded for inference: no LoRA dropout
    model.eval()
    ids, x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, pixel_values=x)[0], model(ids, pixel_values=x)[0], atol=0, rtol=0)


def test_merging_keeps_the_bases_dtype(hf_llava_dir, tmp_path):
    from safetensors import safe_open
    from llava_min.lora import main as lora_main
    base = llava_min.load(hf_llava_dir, dtype=torch.bfloat16)
    llava_min.save_llava(base, tmp_path / "base")
    model = llava_min.load(tmp_path / "base", dtype=torch.float32)
    train_a_few_steps(model)
    save_adapter(model, tmp_path / "adapter", base=tmp_path / "base")
    (tmp_path / "tokenizer.model").write_bytes(b"copied, not read")
    lora_main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
               str(tmp_path / "merged"), "--tokenizer", str(tmp_path / "tokenizer.model")])
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_memory_estimate_counts_what_the_modules_hold():
    """The computed memory table rests on these parameter counts."""
    from llava_min.model.clip import VisionConfig
    from llava_min.model.llama import Llama, LlamaConfig
    from llava_min.tools.memory import llm_params, lora_params, vision_params
    text = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2)
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=28, patch_size=7)
    llm = Llama(text)
    assert llm_params(text) == sum(p.numel() for p in llm.parameters())
    assert vision_params(vision) == sum(p.numel() for p in llava_min.VisionTower(vision).parameters())
    assert lora_params(text, 4) == sum(p.numel() for p in add_lora(llm, LoRAConfig(r=4)))


def test_memory_estimate_counts_what_an_adapter_saves_for_backward():
    """The LoRA term of the activation estimate, against the tensors one adapted layer saves (bf16 base)."""
    from llava_min.model.llama import LlamaConfig
    from llava_min.model.low_rank import LoRALinear
    from llava_min.tools.memory import activation_bytes_per_token_layer
    text = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4)
    extra = activation_bytes_per_token_layer(text, lora_r=8) - activation_bytes_per_token_layer(text)
    saved = 0
    for n_in, n_out in [(64, 64)] * 4 + [(64, 160)] * 2 + [(160, 64)]:  # q, k, v, o, gate, up, down
        layer = LoRALinear(torch.nn.Linear(n_in, n_out, dtype=torch.bfloat16), LoRAConfig(r=8, dropout=0.05))
        x = torch.randn(10, n_in, dtype=torch.bfloat16, requires_grad=True)
        own = {p.data_ptr() for p in layer.parameters()} | {x.data_ptr()}  # weights, and the input the base saves
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.append(0 if t.data_ptr() in own else t.numel() * t.element_size()) or t, lambda t: t):
            layer.train()(x)
        saved += sum(sizes) // 10
    assert extra == saved


def test_an_anyres_adapter_brings_its_grid_and_row_end_vector(hf_llava_dir, tmp_path):
    """LLaVA-NeXT's stage 2 with LoRA: the base has one view; the adapter carries what AnyRes added."""
    model = llava_min.load(hf_llava_dir)
    model.use_anyres([(56, 28), (28, 56), (56, 56)])
    add_lora(model.language_model, CFG)
    save_adapter(model, tmp_path / "adapter", base=hf_llava_dir)
    again = llava_min.load(hf_llava_dir)
    load_adapter(again, tmp_path / "adapter")
    assert again.anyres is not None and again.cfg.image_grid_pinpoints == model.cfg.image_grid_pinpoints
    assert torch.equal(again.image_newline, model.image_newline)


@pytest.mark.parametrize("stage,lora", [("1", False), ("2", False), ("2", True)])
def test_flops_per_token_equal_what_a_step_computes(hf_llava_dir, stage, lora):
    """The MFU formula against torch's FLOP counter on one forward + backward (math attention, logits everywhere)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from llava_min.train.flops import llava_flops_per_token
    model = llava_min.load(hf_llava_dir)
    freeze_for_stage(model, stage, lr=1e-3, lora=CFG if lora else None)
    ids, x, labels = batch()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, pixel_values=x, labels=labels)[1].backward()
    expected = llava_flops_per_token(model, ids.shape[1]) * ids.numel()
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_a_stage1_base_is_asked_for_its_llms_dtype(hf_clip_dir, hf_llama_dir, tmp_path):
    from llava_min.checkpoint.save import save_llama, save_stage1
    from llava_min.lora import stored_dtype
    save_llama(llava_min.load_llama(hf_llama_dir, dtype=torch.bfloat16), tmp_path / "llm")
    model = llava_min.build_llava(hf_clip_dir, tmp_path / "llm", dtype=torch.float32)
    save_stage1(model, tmp_path / "stage1", hf_clip_dir, tmp_path / "llm")  # the projector alone, in fp32
    assert stored_dtype(tmp_path / "stage1") == torch.bfloat16


@pytest.mark.parametrize("flags,r,alpha", [(["--lora-r", "4"], 4, 8.0), (["--lora-r", "4", "--lora-alpha", "16"], 4, 16.0),
                                           ([], 128, 256.0)])
def test_lora_alpha_defaults_to_twice_the_rank(hf_llava_dir, tmp_path, flags, r, alpha):
    """LLaVA-1.5's LoRA (finetune_lora.sh: r 128, alpha 256) scales updates by 2; a smaller --lora-r alone keeps
    that scaling, an explicit --lora-alpha wins (the defaults are the recipe's), and the adapter's config
    records both."""
    import json
    import train
    from llava_min.model.low_rank import LoRALinear
    lora = train.choices(train.parse_args(["--lora"] + flags)).lora
    assert (lora.r, lora.alpha) == (r, alpha)
    model = llava_min.load(hf_llava_dir)
    freeze_for_stage(model, "2", lr=1e-3, lora=lora)
    assert {m.scaling for m in model.modules() if isinstance(m, LoRALinear)} == {alpha / r}
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (r, alpha)
