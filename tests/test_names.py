"""The key-name table, both ways, over the real names of tiny models of each kind: every key a layout's own code
writes lands on exactly one llava-min parameter and goes back to the same key (layout -> ours -> layout), and
every llava-min parameter goes to a key and back (ours -> layout -> ours). The keys come from transformers' and
peft's save_pretrained, transformers' models in memory, and the official layout written by hand."""
import pytest
import torch
from safetensors.torch import load_file

import llava_min
from llava_min.checkpoint.names import (CLIP, LLAMA, LLAVA_HF, OFFICIAL, PEFT_READ, TRANSFORMERS, ignore_reason, ours,
                                        peft_key, peft_to_ours, theirs)
from llava_min.model.low_rank import LoRAConfig, add_lora
from conftest import hf_reference
from test_checkpoints import official_dir

LLM_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def file_keys(path, name="model.safetensors") -> set:
    return {k for k in load_file(path / name) if not ignore_reason(k)}


def names(model) -> set:
    """A llava-min model's parameter names, a tied head once (as every layout stores it)."""
    return set(model.state_dict()) - set(getattr(model, "tied_names", dict)())


def assert_round_trip(layout, our_names: set, keys: set):
    assert {ours(k, layout) for k in keys} == our_names and len(keys) == len(our_names)
    assert {theirs(n, layout) for n in our_names} == keys
    assert all(ours(theirs(n, layout), layout) == n for n in our_names)
    assert all(theirs(ours(k, layout), layout) == k for k in keys)


def test_clip_and_llama_directories(hf_clip_dir, hf_llama_dir, tmp_path):
    from transformers import CLIPVisionModel
    vision = llava_min.load_vision(hf_clip_dir)
    assert_round_trip(CLIP, names(vision), file_keys(hf_clip_dir))  # a full CLIPModel's vision tower
    hf_reference(CLIPVisionModel, hf_clip_dir).save_pretrained(tmp_path / "vision_only")
    assert_round_trip(CLIP, names(vision), file_keys(tmp_path / "vision_only"))
    assert_round_trip(LLAMA, names(llava_min.load_llama(hf_llama_dir)), file_keys(hf_llama_dir))


@pytest.mark.parametrize("kind", ["llava", "llava-next"])
def test_transformers_models_in_memory(hf_llava_dir, hf_next_dir, kind):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    cls, path = (LlavaNextForConditionalGeneration, hf_next_dir) if kind == "llava-next" else \
        (LlavaForConditionalGeneration, hf_llava_dir)
    assert_round_trip(TRANSFORMERS, names(llava_min.load(path)), set(hf_reference(cls, path).state_dict()))


@pytest.mark.parametrize("kind", ["llava", "llava-next"])
def test_llava_hf_files(hf_llava_dir, hf_next_dir, tmp_path, kind):
    """What transformers 5 saves is read (also_read); what llava-min writes (the hub's names) transformers loads
    with no key missing or left over."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    cls, path = (LlavaNextForConditionalGeneration, hf_next_dir) if kind == "llava-next" else \
        (LlavaForConditionalGeneration, hf_llava_dir)
    model = llava_min.load(path)
    assert {ours(k, LLAVA_HF) for k in file_keys(path)} == names(model)
    llava_min.save_llava(model, tmp_path / "ours")
    written = file_keys(tmp_path / "ours")
    assert_round_trip(LLAVA_HF, names(model), written)
    assert written != file_keys(path) and all(k.startswith("vision_tower.vision_model.") for k in written - file_keys(path))
    _, info = cls.from_pretrained(tmp_path / "ours", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("version", ["1.5", "1.6"])
def test_official_layout(hf_llava_dir, hf_next_dir, tmp_path, version):
    """1.5: Vicuna's names + the projector (CLIP lives elsewhere); 1.6: + the row-end vector and the tuned tower."""
    path = hf_next_dir if version == "1.6" else hf_llava_dir
    tensors = load_file(path / "model.safetensors")
    keys = set(torch.load(official_dir(path, tensors, tmp_path, "unused", tuned_tower=version == "1.6")
                          / "pytorch_model.bin", weights_only=True))
    ours_ = names(llava_min.load(path))
    if version == "1.5":
        ours_ = {n for n in ours_ if not n.startswith("vision_tower.")}
    assert_round_trip(OFFICIAL, ours_, keys)
    assert ours("model.mm_projector.weight", OFFICIAL) == "projector.linear_1.weight"  # LLaVA v1's linear W


def test_peft_adapters(hf_llava_dir, tmp_path):
    """peft's names on transformers 5's model (LoRA on the LLM and CLIP, the projector fully trained), and the
    official LoRA release's on LlavaLlamaForCausalLM."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration
    theirs_ = get_peft_model(hf_reference(LlavaForConditionalGeneration, hf_llava_dir),
                             LoraConfig(r=2, lora_alpha=4, target_modules=list(LLM_LAYERS),
                                        modules_to_save=["multi_modal_projector"]))
    theirs_.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    model = llava_min.load(hf_llava_dir)
    add_lora(model.language_model, LoRAConfig(r=2))
    add_lora(model.vision_tower, LoRAConfig(r=2, targets=LLM_LAYERS))  # the names reach CLIP's q, k, v
    adapter = {n for n in names(model) if ".lora_" in n or n.startswith("projector.")}
    assert {peft_to_ours(k) for k in keys} == adapter and len(keys) == len(adapter)
    assert {peft_key(n) for n in adapter} == keys
    release = official_dir(hf_llava_dir, load_file(hf_llava_dir / "model.safetensors"), tmp_path / "official", "unused")
    layers = [k[: -len(".weight")] for k in torch.load(release / "pytorch_model.bin", weights_only=True)
              if k.endswith(tuple(f"{n}.weight" for n in LLM_LAYERS))]
    official = {f"base_model.model.{k}.lora_{m}.weight" for k in layers for m in "AB"}
    assert {peft_to_ours(k) for k in official} == {n for n in adapter if n.startswith("language_model.")}


@pytest.mark.parametrize("layouts", [(LLAVA_HF, TRANSFORMERS), PEFT_READ], ids=["llava-hf", "peft"])
def test_layouts_read_together_never_disagree(layouts):
    """A prefix two layouts both name must mean the same part; within a layout, each part is written one way."""
    meaning = {}
    for layout in layouts:
        assert len({p[0] for p in layout.written}) == len({p[1] for p in layout.written}) == len(layout.written)
        for prefix, part in layout.written + layout.also_read:
            assert meaning.setdefault(prefix, part) == part, prefix


def test_loading_never_imports_saving():
    from test_layout import MODULES
    seen, todo = set(), ["llava_min.checkpoint.load", "llava_min.checkpoint.peft"]
    while todo:
        name = todo.pop()
        seen.add(name)
        todo += [m for m in MODULES.get(name, ()) if m in MODULES and m not in seen]
    assert "llava_min.checkpoint.save" not in seen

