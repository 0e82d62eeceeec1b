"""The LLaMA tokenizer against transformers, on the real Vicuna tokenizer (skipped when it is absent)
and on a tiny tokenizer trained from the project's own text (always runs).

References. transformers 5 has only the `tokenizers`-backed LlamaTokenizer. With `legacy=False` it agrees
with us on all text except text that *starts* with whitespace and runs of several spaces, where the
tokenizers BPE and sentencepiece's BPE merge differently. LLaVA-1.5 was trained with the slow,
sentencepiece tokenizer (`use_fast=False`), so we follow sentencepiece there, and check it against
transformers' own sentencepiece backend driven the way the v4 slow LlamaTokenizer(legacy=False) drove it.
"""
import json
import shutil

import pytest

from llava_min.tokenizer import Tokenizer, train_tokenizer

TEXTS = [
    "Hello world", "A chat between a curious user and an artificial intelligence assistant.",
    "USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: Why? ASSISTANT: Because.</s>",
    "\nnewline first", "ends with a newline\n", "emoji 🦙 and 中文 and ünïcödé", "digits 12345 and 3.14159",
    "</s>USER: right after a special token", "<s>Hello", "a</s> b", "x<unk>y", "tabs\tand\ttabs", "trailing ",
    "What color is the circle?\nAnswer the question using a single word or phrase.",
]
EDGE_TEXTS = [" Hello", "  double  spaces ", "▁literal underline", "a  b   c", " \n "]


@pytest.fixture(scope="module")
def fast_reference(llama_tokenizer_path, tmp_path_factory):
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("vicuna_tok")
    shutil.copy(llama_tokenizer_path, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return AutoTokenizer.from_pretrained(path)


def slow_reference(path):
    """transformers' sentencepiece backend as the v4 slow LlamaTokenizer(legacy=False) used it:
    one "▁" before the whole text, specials split out, no dummy prefix inside."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    backend = SentencePieceBackend(vocab_file=str(path), legacy=False, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")

    def encode(text):
        tokens = backend.tokenize("▁" + text.replace("▁", " "))
        if len(tokens) > 1 and tokens[0] == "▁" and tokens[1] in ("<s>", "</s>", "<unk>"):
            tokens = tokens[1:]
        return backend.convert_tokens_to_ids(tokens)
    return encode


@pytest.mark.parametrize("text", TEXTS)
def test_equals_transformers_llama_tokenizer(llama_tokenizer_path, fast_reference, text):
    assert Tokenizer(llama_tokenizer_path).encode(text) == fast_reference.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS + EDGE_TEXTS)
def test_equals_the_slow_sentencepiece_tokenizer(llama_tokenizer_path, text):
    assert Tokenizer(llama_tokenizer_path).encode(text) == slow_reference(llama_tokenizer_path)(text)


def test_special_tokens_are_ids_not_text(llama_tokenizer_path):
    tok = Tokenizer(llama_tokenizer_path)
    ids = tok.encode("A1</s>USER", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 2 in ids[1:-1]
    after = ids[ids.index(2, 1) + 1:-1]
    assert [tok.id_to_piece(i) for i in after] == ["USER"]  # no "▁" after a special token (legacy=False)
    assert tok.vocab_size == 32000 and (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 0)


@pytest.mark.parametrize("text", ["Hello world", "emoji 🦙 and 中文", "line\nbreak"])
def test_decode_round_trip(llama_tokenizer_path, text):
    tok = Tokenizer(llama_tokenizer_path)
    assert tok.decode(tok.encode(text, bos=True, eos=True) + [-200, 32000]) == text


def test_tiny_trained_tokenizer_follows_llama_conventions(tiny_tokenizer, tmp_path):
    tok = Tokenizer(tiny_tokenizer)
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    text = "A red circle at the top.</s>How many squares? 12 ✓"
    assert tok.decode(tok.encode(text)) == text.replace("</s>", "")  # byte fallback covers unseen characters
    assert 2 in tok.encode(text)
    train_tokenizer(tiny_tokenizer.parent / "corpus.txt", tmp_path / "again.model", vocab_size=300)
    again = Tokenizer(tmp_path / "again.model")  # deterministic (the file also records its temporary paths)
    assert [again.id_to_piece(i) for i in range(again.vocab_size)] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]


def test_tiny_tokenizer_matches_the_slow_reference(tiny_tokenizer):
    tok, ref = Tokenizer(tiny_tokenizer), slow_reference(tiny_tokenizer)
    for text in TEXTS + EDGE_TEXTS:
        assert tok.encode(text) == ref(text), text


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.model"):
        Tokenizer(tmp_path / "nothere.model")
