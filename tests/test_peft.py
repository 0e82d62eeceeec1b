"""LoRA adapters in peft's files, both ways, and the official LLaVA LoRA release layout.

ours -> peft: an adapter llava-min saves loads with PeftModel.from_pretrained on the llava-hf base and gives
our logits (fp32, 1e-5) and greedy tokens. peft -> ours: an adapter peft saves (LoRA reaching CLIP too, the
projector in modules_to_save) applies, merges and saves as llava-hf. The official release layout, written
here by hand, equals the same adapter merged into the weights by hand."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llava_min
from llava_min import CheckpointError
from llava_min.checkpoint.peft import load_adapted, merge_adapter
from llava_min.checkpoint.save import save_adapter
from llava_min.data.image import anyres_pixels
from llava_min.lora import main as lora_main
from llava_min.model.low_rank import LoRAConfig, add_lora
from conftest import IMAGE_TOKEN, hf_reference
from test_anyres import image
from test_checkpoints import official_dir, save_clip
from test_model import TOL, image_prompt, pixels

LLM_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize(params):
    """Trained-looking adapters: peft and we both start with B = 0, which would hide a wrong A or scaling."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))


def trained_ours(path, anyres: bool):
    model = llava_min.load(path)
    params = add_lora(model.language_model, LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    randomize(params + list(model.projector.parameters()) + ([model.image_newline] if anyres else []))
    return model.eval()


def llava_inputs(model, anyres: bool):
    """(our ids, transformers' ids, pixel_values for each, image sizes)."""
    if not anyres:
        ids = image_prompt(16)
        return ids, ids, pixels(1), pixels(1), None
    size = (30, 100)
    x = anyres_pixels(image(size), model.anyres)
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * model.image_token_count(size) + [7, 8, 9]])
    return ids, ids, x, x[None], torch.tensor([size])


@pytest.mark.parametrize("anyres", [False, True], ids=["llava", "llava-next"])
def test_our_adapter_loads_in_peft_with_our_logits_and_tokens(hf_llava_dir, hf_next_dir, tmp_path, anyres):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    base = hf_next_dir if anyres else hf_llava_dir
    ours = trained_ours(base, anyres)
    save_adapter(ours, tmp_path / "adapter", base=base)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["modules_to_save"] == ["multi_modal_projector"] + (["image_newline"] if anyres else [])
    cls = LlavaNextForConditionalGeneration if anyres else LlavaForConditionalGeneration
    theirs = PeftModel.from_pretrained(hf_reference(cls, base), tmp_path / "adapter").eval()
    assert sum(".lora_A." in n for n, _ in theirs.named_parameters()) == 2 * len(LLM_LAYERS)  # the LLM's alone
    ids, hf_ids, x, hf_x, sizes = llava_inputs(ours, anyres)
    extra = {"image_sizes": sizes} if anyres else {}
    with torch.no_grad():
        expected = theirs(input_ids=hf_ids, pixel_values=hf_x, **extra).logits
        torch.testing.assert_close(ours(ids, pixel_values=x, image_sizes=sizes)[0], expected, **TOL)
    want = theirs.generate(input_ids=hf_ids, pixel_values=hf_x, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                           **extra)[:, ids.shape[1]:]
    ours.cfg.text.eos_token_id = -1  # (as min_new_tokens: never stop early)
    assert ours.generate(ids, pixel_values=x, max_new_tokens=12, image_sizes=sizes).tolist() == want.tolist()
    again = load_adapted(tmp_path / "adapter")  # on the base its adapter_config.json names
    with torch.no_grad():
        torch.testing.assert_close(again(ids, pixel_values=x, image_sizes=sizes)[0], expected, **TOL)
    with pytest.raises(CheckpointError, match="is a LoRA adapter, not a whole model"):
        llava_min.load(tmp_path / "adapter")


OLD_NAMES = [("base_model.model.model.language_model.", "base_model.model.language_model.model."),
             ("base_model.model.model.vision_tower.", "base_model.model.vision_tower."),
             ("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector.")]


@pytest.fixture(scope="module")
def peft_adapter(hf_llava_dir, tmp_path_factory):
    """An adapter peft makes the usual way: a list of layer names (which reaches CLIP's q/k/v too) and the
    projector as modules_to_save. Returns its directory and the PeftModel's logits and greedy tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration
    model = get_peft_model(hf_reference(LlavaForConditionalGeneration, hf_llava_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(LLM_LAYERS),
                                      modules_to_save=["multi_modal_projector"]))
    randomize([p for p in model.parameters() if p.requires_grad])
    path = tmp_path_factory.mktemp("peft_adapter")
    model.save_pretrained(path)
    with torch.no_grad():
        logits = model.eval()(input_ids=image_prompt(16), pixel_values=pixels(1)).logits
    tokens = model.generate(input_ids=image_prompt(16), pixel_values=pixels(1), max_new_tokens=12, min_new_tokens=12,
                            do_sample=False)[:, image_prompt(16).shape[1]:]
    return path, logits, tokens


@pytest.mark.parametrize("naming", ["transformers5", "transformers4"])
def test_peft_adapter_applies_and_merges(peft_adapter, hf_llava_dir, tmp_path, naming):
    path, expected, tokens = peft_adapter
    if naming == "transformers4":  # what peft saved before transformers 4.52 renamed the parts
        path = shutil.copytree(path, tmp_path / "old")
        tensors = load_file(path / "adapter_model.safetensors")
        renamed = {next((new + k[len(old):] for old, new in OLD_NAMES if k.startswith(old)), k): v
                   for k, v in tensors.items()}
        save_file(renamed, path / "adapter_model.safetensors")
    model = load_adapted(path, hf_llava_dir)
    assert any(".lora_A" in n for n, _ in model.vision_tower.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(image_prompt(16), pixel_values=pixels(1))[0], expected, **TOL)
    model.cfg.text.eos_token_id = -1  # (as min_new_tokens: never stop early)
    assert model.generate(image_prompt(16), pixel_values=pixels(1), max_new_tokens=12).tolist() == tokens.tolist()
    (tmp_path / "tok.model").write_bytes(b"copied, not read")
    lora_main(["merge", "--base", str(hf_llava_dir), "--adapter", str(path), "--out", str(tmp_path / "merged"),
               "--tokenizer", str(tmp_path / "tok.model")])
    from transformers import LlavaForConditionalGeneration
    with torch.no_grad():
        merged = hf_reference(LlavaForConditionalGeneration, tmp_path / "merged")
        torch.testing.assert_close(merged(input_ids=image_prompt(16), pixel_values=pixels(1)).logits, expected, **TOL)


def test_an_adapter_that_is_not_peft_s_is_refused_by_name(hf_llava_dir, tmp_path):
    """llava-min's earlier format (llava-min's names, `alpha` and `targets`) is no longer read: never half-read."""
    model = trained_ours(hf_llava_dir, anyres=False)
    (tmp_path / "old").mkdir()
    state = {k: v for k, v in model.state_dict().items() if ".lora_" in k or k.startswith("projector.")}
    save_file(state, tmp_path / "old" / "adapter.safetensors")
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(LLM_LAYERS), "base": str(hf_llava_dir)}))
    with pytest.raises(CheckpointError, match="adapter_config.json: peft_type None is not supported"):
        load_adapted(tmp_path / "old", hf_llava_dir)


@pytest.mark.parametrize("key,value", [("use_dora", True), ("use_rslora", True), ("peft_type", "IA3"),
                                       ("layers_to_transform", [0])])
def test_a_peft_setting_beyond_plain_lora_is_named(peft_adapter, hf_llava_dir, tmp_path, key, value):
    path = shutil.copytree(peft_adapter[0], tmp_path / "edited")
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(CheckpointError, match=re.escape(f"{key} {value!r} is not supported")):
        load_adapted(path, hf_llava_dir)


# ---------------------------------------------------------------- the official LoRA release

R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def release(chat_model, tmp_path_factory):
    """liuhaotian/llava-v1.5-7b-lora's layout on the tiny chat model's weights: peft's adapter on
    LlavaLlamaForCausalLM's names, non_lora_trainables.bin, the official config; its base: Vicuna + CLIP.
    Also the same model merged by hand (W + alpha / r B A) in the official whole-model layout."""
    root = tmp_path_factory.mktemp("lora_release")
    tensors = load_file(chat_model / "model.safetensors")
    clip = save_clip(chat_model, tensors, root / "clip")
    vicuna = official_dir(chat_model, tensors, root / "vicuna", vision_tower="unused", include_projector=False)
    cfg = json.loads((vicuna / "config.json").read_text())
    (vicuna / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if not k.startswith("mm_")}
                                                   | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    shutil.copy(chat_model / "tokenizer.model", vicuna / "tokenizer.model")
    hand = official_dir(chat_model, tensors, root / "by_hand", vision_tower=clip)
    weights = torch.load(hand / "pytorch_model.bin", weights_only=True)
    lora, torch_rng = {}, torch.Generator().manual_seed(8)
    for key in [k for k in weights if k.endswith(tuple(f"{n}.weight" for n in LLM_LAYERS))]:
        out_features, in_features = weights[key].shape
        a, b = (0.3 * torch.randn(shape, generator=torch_rng) for shape in ((R, in_features), (out_features, R)))
        lora[f"base_model.model.{key[:-len('.weight')]}.lora_A.weight"] = a
        lora[f"base_model.model.{key[:-len('.weight')]}.lora_B.weight"] = b
        weights[key] = weights[key] + ALPHA / R * b @ a  # applied by hand
    torch.save(weights, hand / "pytorch_model.bin")
    rel = root / "llava-v1.5-lora"
    rel.mkdir()
    (rel / "config.json").write_text((hand / "config.json").read_text())
    torch.save(lora, rel / "adapter_model.bin")
    torch.save({"base_model.model." + k: v for k, v in weights.items() if "mm_projector" in k},
               rel / "non_lora_trainables.bin")
    (rel / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "lmsys/vicuna-7b-v1.5", "r": R,
         "lora_alpha": ALPHA, "lora_dropout": 0.05, "target_modules": list(LLM_LAYERS), "bias": "none",
         "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}))
    return rel, vicuna, hand


def release_prompt(image_token):
    return torch.tensor([[1, 5, 6] + [image_token] * 16 + [7, 8, 9]]), pixels(1)


def test_official_release_equals_the_adapter_applied_by_hand(release, tmp_path):
    rel, vicuna, hand = release
    ids, x = release_prompt(-200)
    with torch.no_grad():
        expected = llava_min.load(hand)(ids, pixel_values=x)[0]
        model = load_adapted(rel, vicuna)
        torch.testing.assert_close(model(ids, pixel_values=x)[0], expected, **TOL)
        merge_adapter(model)
        torch.testing.assert_close(model(ids, pixel_values=x)[0], expected, **TOL)
    lora_main(["merge", "--base", str(vicuna), "--adapter", str(rel), "--out", str(tmp_path / "merged")])
    from transformers import LlavaForConditionalGeneration
    merged = hf_reference(LlavaForConditionalGeneration, tmp_path / "merged")  # <image> appended: id 448
    hf_ids, _ = release_prompt(merged.config.image_token_id)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=hf_ids, pixel_values=x).logits[..., :448], expected, **TOL)
    with pytest.raises(CheckpointError, match="lmsys/vicuna-7b-v1.5.*--model-base"):
        load_adapted(rel)  # the base it names is not here


def test_chat_and_eval_take_the_release_with_its_base(release, chat_model, tmp_path):
    import chat
    from llava_min.eval.__main__ import main as eval_main
    from llava_min.eval.answer import answer
    rel, vicuna, hand = release
    args = ["--model", str(rel), "--model-base", str(vicuna), "--temperature", "0", "--device", "cpu"]
    session = chat.open_chat(chat.parse_args(args))
    by_hand = chat.Chat(llava_min.load(hand), session.tok, "vicuna_v1", temperature=0)
    for c in (session, by_hand):
        c.max_new_tokens = 8
        c.set_image(chat_model / "cat.png")
    assert session.ask("What is it?") == by_hand.ask("What is it?")
    records = [{"id": i, "format": "short", "answer": "a cat", "image": name,
                "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}
               for i, name in enumerate(("cat.png", "dog.png"))]
    (tmp_path / "eval.json").write_text(json.dumps(records))
    eval_main(["--model", str(rel), "--model-base", str(vicuna), "--data", str(tmp_path / "eval.json"), "--image-folder",
             str(chat_model), "--device", "cpu", "--out", str(tmp_path / "results.json")])
    predictions = [p["prediction"] for p in json.loads((tmp_path / "results.json").read_text())["predictions"]]
    assert predictions == answer(by_hand.model, session.tok, records, chat_model)
