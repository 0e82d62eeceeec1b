"""The LLaVA-1.6 templates (mistral_instruct, chatml_direct, llava_llama_2) against the official renderer, their
labels, the tokenizer's special tokens (ChatML's `<|im_start|>` / `<|im_end|>` as single ids) and their stops.

The official renderer is `Conversation.get_prompt` of llava-torch 1.2.2.post1, found where pip put the `llava`
package (`pip install --no-deps llava-torch==1.2.2.post1`: its dependencies pin transformers 4.37 and torch 2.1)
and loaded from `llava/conversation.py` alone, which needs only the standard library and PIL.
"""
import importlib.util
import io
import random
import re
from pathlib import Path

import pytest

from llava_min.conversation import render_prompt, stop_at, stop_text, tokenize_conversation
from llava_min.tokenizer import Tokenizer
from test_conversation import official_ids, supervised_runs

NEW = ["mistral_instruct", "chatml_direct", "llava_llama_2"]
LLAVA_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                "the user provides, and assist the user with a variety of tasks using natural language.")
RECORD = [{"from": "human", "value": "What is shown here?\n<image>"}, {"from": "gpt", "value": "A red circle."},
          {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "At the top left."}]


@pytest.fixture(scope="module")
def official():
    """The official `llava/conversation.py`, loaded by path: importing `llava` would pull in its model code."""
    spec = importlib.util.find_spec("llava")
    path = Path(list(spec.submodule_search_locations)[0]) / "conversation.py" if spec else None
    if path is None or not path.is_file():
        pytest.skip("the official LLaVA code is not installed (pip install --no-deps llava-torch==1.2.2.post1)")
    module_spec = importlib.util.spec_from_file_location("official_llava_conversation", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- rendering

PIECES = ["What is in the image?", "Describe it in detail.", "a red circle", "2 squares, 3.5 cm", "emoji 🦙🦙",
          "中文 and 日本語", "ünïcödé", "עברית", "no\u00a0break", "zero\u200bwidth", " ", "\n", "\t", "  ", "[INST]",
          "</s>", "<s>", "<|im_end|>", "###", "USER:", "<<SYS>>", "x\n\ny"]


def message(rng, empty_ok):
    """A message: words, unicode, bare whitespace, other templates' markers, sometimes nothing at all."""
    if empty_ok and rng.random() < 0.1:
        return ""
    return rng.choice(["", " ", "\n"]).join(rng.choice(PIECES) for _ in range(rng.randint(1, 3)))


def conversation(rng, empty_ok=True):
    """1-7 turns (an odd count leaves the prompt open); `<image>` anywhere in the first turn, or nowhere."""
    turns = [message(rng, empty_ok) for _ in range(rng.randint(1, 7))]
    if rng.random() < 0.7:
        at = rng.randint(0, len(turns[0]))
        turns[0] = turns[0][:at] + rng.choice(["<image>", "<image>\n", "\n<image>", " <image> "]) + turns[0][at:]
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(turns)]


def official_prompt(official, template, record):
    """The official dataset moves `<image>` (train.py, preprocess_multimodal), then `get_prompt` renders; an
    open prompt is the assistant's message None, as the official CLI leaves it."""
    conv = official.conv_templates[template].copy()
    conv.messages = []
    for i, turn in enumerate(record):
        value = turn["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        conv.append_message(conv.roles[i % 2], value)
    if len(record) % 2:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("template", NEW + ["vicuna_v1", "llava_v1", "llava_v0"])
def test_rendered_prompts_equal_the_official_get_prompt(official, template):
    # empty messages only for the 1.6 templates: vicuna's renders them as text where the official leaves a slot
    rng, compared = random.Random(template), 0
    for _ in range(300):
        record = conversation(rng, empty_ok=template in NEW)
        try:
            expected = official_prompt(official, template, record)
        except AssertionError:  # LLAMA_2's first message may not be empty
            with pytest.raises(ValueError, match="empty first turn"):
                render_prompt(record, template)
            continue
        assert render_prompt(record, template) == expected, record
        compared += 1
    assert compared >= 100


def test_rendered_examples_written_out():
    assert render_prompt(RECORD, "mistral_instruct") == (
        "[INST] <image>\nWhat is shown here? [/INST] A red circle. </s>[INST] Where is it? [/INST] At the top left. </s>")
    assert render_prompt(RECORD, "llava_llama_2") == (
        f"[INST] <<SYS>>\n{LLAVA_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is shown here? [/INST] A red circle. </s>"
        "<s>[INST] Where is it? [/INST] At the top left. </s>")
    assert render_prompt(RECORD[:3], "chatml_direct") == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown here?<|im_end|>"
        "<|im_start|>assistant\nA red circle.<|im_end|><|im_start|>user\nWhere is it?<|im_end|><|im_start|>assistant\n")
    assert render_prompt(RECORD[:1], "mistral_instruct") == "[INST] <image>\nWhat is shown here? [/INST]"


def test_empty_messages_render_as_the_official_code_renders_them():
    record = [{"from": f, "value": v} for f, v in [("human", "Hi"), ("gpt", ""), ("human", ""), ("gpt", "Yes")]]
    assert render_prompt(record, "mistral_instruct") == "[INST] Hi [/INST] Yes </s>"
    assert render_prompt(record, "chatml_direct").endswith(
        "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n<|im_start|>user\n<|im_start|>assistant\nYes<|im_end|>")
    with pytest.raises(ValueError, match="empty first turn"):
        render_prompt([{"from": "human", "value": ""}], "llava_llama_2")


# ---------------------------------------------------------------- the tokenizer's special tokens

def train_chatml_tokenizer(folder: Path, kind="control_symbols") -> Path:
    """A tiny Yi-style tokenizer: `<|startoftext|>` / `<|endoftext|>` at 1 / 2 and ChatML's two tokens, as control
    pieces (or user-defined ones: sentencepiece then keeps them whole itself)."""
    import sentencepiece as spm
    lines = [f"The {c} {s} is at the {p}. What is shown here? Answer the questions." for c in ("red", "blue")
             for s in ("circle", "square") for p in ("top", "left")]
    (folder / "corpus.txt").write_text("\n".join(lines * 20))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_writer=model, vocab_size=300, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, bos_piece="<|startoftext|>", eos_piece="<|endoftext|>",
        normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2,
        **{kind: ["<|im_start|>", "<|im_end|>"]})
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder / "tokenizer.model"


@pytest.fixture(scope="module", params=["control_symbols", "user_defined_symbols"])
def chatml(request, tmp_path_factory):
    path = train_chatml_tokenizer(tmp_path_factory.mktemp(request.param), request.param)
    return Tokenizer(path), chatml_reference(path)


def chatml_reference(path):
    """transformers 4's slow LlamaTokenizer(legacy=False), from transformers 5's sentencepiece backend, with
    ChatML's tokens as special tokens (test_tokenizer.slow_reference, for other names)."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    specials = ["<|im_start|>", "<|im_end|>"]
    backend = SentencePieceBackend(vocab_file=str(path), legacy=False, unk_token="<unk>",
                                   bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   additional_special_tokens=specials)

    def encode(text):
        tokens = backend.tokenize("▁" + text) if text else []
        if len(tokens) > 1 and tokens[0] == "▁" and tokens[1] in specials:
            tokens = tokens[1:]
        return backend.convert_tokens_to_ids(tokens)
    return encode


def test_chatml_tokens_are_single_ids(chatml):
    tok, reference = chatml
    start, end = tok.special["<|im_start|>"], tok.special["<|im_end|>"]
    ids = tok.encode("<|im_start|>user\nThe red circle<|im_end|>")
    assert ids[0] == start and ids[-1] == end and ids.count(start) == ids.count(end) == 1
    assert tok.decode(ids) == "user\nThe red circle"  # special tokens are left out of the text
    assert tok.special["<|startoftext|>"] == tok.bos_id == 1 and tok.special["<|endoftext|>"] == tok.eos_id == 2
    assert "</s>" not in tok.special  # LLaMA's names mean nothing to this tokenizer
    for text in ["<|im_start|>system\nAnswer the questions.<|im_end|>", "a<|im_end|> b", " <|im_start|>x", "<|im_end|>"]:
        assert tok.encode(text) == reference(text), text


def test_a_template_whose_special_tokens_the_tokenizer_lacks_is_named(chatml, tiny_tokenizer):
    with pytest.raises(ValueError, match=re.escape("chatml_direct template needs <|im_start|> and <|im_end|> as")):
        tokenize_conversation(RECORD, Tokenizer(tiny_tokenizer), "chatml_direct")
    with pytest.raises(ValueError, match="mistral_instruct template needs </s> as tokens"):
        tokenize_conversation(RECORD, chatml[0], "mistral_instruct")


def test_a_tokenizer_without_llamas_special_ids_is_refused(tmp_path):
    import sentencepiece as spm
    (tmp_path / "c.txt").write_text("a red circle\n" * 50)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "t"), vocab_size=40,
                                   unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="id 1 is '</s>', LLaMA's convention needs the bos token there"):
        Tokenizer(tmp_path / "t.model")


# ---------------------------------------------------------------- labels

def check_labels(tok, reference, template, marker_id, tail):
    """ids equal the official recipe on the rendered prompt; each reply is one supervised run ending in its
    marker, and nothing else is supervised."""
    ids, labels = tokenize_conversation(RECORD, tok, template, num_image_tokens=3, image_token_id=-200)
    assert ids == official_ids(render_prompt(RECORD, template), reference, 3)
    runs = supervised_runs(ids, labels)
    assert len(runs) == 2
    for run, reply in zip(runs, ["A red circle.", "At the top left."]):
        assert run[-1] == marker_id and marker_id not in run[:-1]
        assert tok.decode(run) == reply + tail
    assert sum(len(r) for r in runs) == sum(label != -100 for label in labels)


@pytest.mark.parametrize("template", ["mistral_instruct", "llava_llama_2"])
def test_llama_2_labels_are_the_replies_and_their_eos(tokenizers, template):
    tok, reference = tokenizers
    check_labels(tok, reference, template, tok.eos_id, " ")  # " A red circle. </s>": the space before </s> too


def test_chatml_labels_are_the_replies_and_their_im_end(chatml):
    tok, reference = chatml
    check_labels(tok, reference, "chatml_direct", tok.special["<|im_end|>"], "")


@pytest.fixture(scope="module", params=["llama", "tiny"])
def tokenizers(request):
    from test_tokenizer import slow_reference
    path = request.getfixturevalue("llama_tokenizer_path" if request.param == "llama" else "tiny_tokenizer")
    return Tokenizer(path), slow_reference(path)


# ---------------------------------------------------------------- stops

def test_each_template_stops_where_its_replies_end(chatml):
    tok, _ = chatml
    assert {t: stop_text(t) for t in NEW} == {"mistral_instruct": None, "llava_llama_2": None,
                                              "chatml_direct": "<|im_end|>"}  # None: at EOS
    stop = stop_at(tok, stop_text("chatml_direct"))
    text = tok.encode("The red circle.", prefix=False)
    assert not stop(text) and stop(text + [tok.special["<|im_end|>"]])
    assert not stop(text + [tok.special["<|im_start|>"]])
