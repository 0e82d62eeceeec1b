"""The LLaMA tokenizer against transformers, on the real Vicuna tokenizer (skipped when it is absent) and
on a tiny tokenizer trained from generated text (always runs).

Which reference. LLaVA-1.5 loads Vicuna v1.5's tokenizer with `use_fast=False` and `legacy: false`:
transformers 4's sentencepiece LlamaTokenizer. transformers 5 no longer has that class:
- `transformers.LlamaTokenizer` is now the `tokenizers` BPE (the old "fast" one). Built with
  `from_pretrained` on a folder holding tokenizer.model and `legacy: false`, it agrees with sentencepiece
  on ordinary text but not on runs of several spaces or text that starts with a space (" Hello":
  sentencepiece `▁`, `▁Hello`; tokenizers `▁Hello`. "a  b": `▁a`, `▁`, `▁b` vs `▁a`, `▁▁`, `b`), because
  sentencepiece never merges across a word start and tokenizers' BPE does.
  `LlamaTokenizer(vocab_file=..., legacy=False)` silently ignores the file (3-token vocabulary).
- `SentencePieceBackend(vocab_file=..., legacy=False)` keeps transformers 4's slow `_tokenize` verbatim
  (sentencepiece with add_dummy_prefix off, the `<unk>`-prefix trick, special tokens split out first).
  What it lacks is LlamaTokenizer.tokenize's two lines: put "▁" before the text, and drop it again when
  the text starts with a special token. `slow_reference` adds them: that is the reference, exactly.
"""
import json
import shutil

import pytest

from llava_min.tokenizer import Tokenizer, train_tokenizer, without_dummy_prefix

TEXTS = [
    "Hello world", "A chat between a curious user and an artificial intelligence assistant.",
    "USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: Why? ASSISTANT: Because.</s>",
    "\nnewline first", "ends with a newline\n", "x\n\ny", "emoji 🦙 and 中文 and ünïcödé", "日本語のテキスト",
    "digits 12345 and 3.14159", "</s>USER: right after a special token", "<s>Hello", "a</s> b", "x<unk>y",
    "A</s>\nB", "tabs\tand\ttabs", "trailing ", "What color is the circle?\nAnswer with the option's letter.",
    "###Human: hi###Assistant: yo###", "A\u00a0B (no-break space)", "",
]
SPACE_TEXTS = [" Hello", "  double  spaces ", "▁literal underline", "a  b   c", " \n ", "A</s>  B", " </s>x",
               "end  ", "    four leading", "x \n y"]


def slow_reference(path):
    """transformers 4's slow LlamaTokenizer(legacy=False), from transformers 5's sentencepiece backend."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    backend = SentencePieceBackend(vocab_file=str(path), legacy=False, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")

    def encode(text):
        if not text:
            return []
        tokens = backend.tokenize("▁" + text.replace("▁", " "))
        if len(tokens) > 1 and tokens[0] == "▁" and tokens[1] in ("<s>", "</s>", "<unk>"):
            tokens = tokens[1:]
        return backend.convert_tokens_to_ids(tokens)
    return encode


@pytest.fixture(scope="module")
def llama(llama_tokenizer_path):
    return Tokenizer(llama_tokenizer_path), slow_reference(llama_tokenizer_path)


@pytest.fixture(scope="module")
def fast_reference(llama_tokenizer_path, tmp_path_factory):
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("vicuna_tok")
    shutil.copy(llama_tokenizer_path, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return AutoTokenizer.from_pretrained(path)


def test_equals_the_slow_llama_tokenizer(llama):
    tok, reference = llama
    for text in TEXTS + SPACE_TEXTS:
        assert tok.encode(text) == reference(text), text


def test_equals_transformers_5_llama_tokenizer_on_ordinary_text(llama, fast_reference):
    tok, _ = llama
    for text in TEXTS:
        assert tok.encode(text) == fast_reference.encode(text, add_special_tokens=False), text


def test_special_tokens_are_ids_not_text(llama):
    tok, _ = llama
    assert tok.vocab_size == 32000 and (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    ids = tok.encode("A1</s>USER:", bos=True, eos=True)
    assert [tok.id_to_piece(i) for i in ids] == ["<s>", "▁A", "1", "</s>", "USER", ":", "</s>"]  # legacy=False
    assert tok.encode("</s>", prefix=False) == [2] and tok.encode("x", prefix=False) != tok.encode("x")
    assert tok.sp.encode("</s>", out_type=str) != ["</s>"]  # why the special tokens are split out first


@pytest.mark.parametrize("text", ["Hello world", "emoji 🦙 and 中文", "line\nbreak", "  two leading", "1, 2, 3."])
def test_decode_round_trip(llama, text):
    tok, _ = llama
    assert tok.decode(tok.encode(text, bos=True, eos=True) + [-200, 32000, 0]) == text  # image ids, unk skipped


def test_dummy_prefix_switch_edits_only_that_field(llama_tokenizer_path):
    from sentencepiece import sentencepiece_model_pb2 as pb
    original = pb.ModelProto.FromString(llama_tokenizer_path.read_bytes())
    edited = pb.ModelProto.FromString(without_dummy_prefix(llama_tokenizer_path.read_bytes()))
    assert original.normalizer_spec.add_dummy_prefix and not edited.normalizer_spec.add_dummy_prefix
    edited.normalizer_spec.add_dummy_prefix = True
    assert edited == original


# ---------------------------------------------------------------- a tiny tokenizer trained here

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [f"USER: How many {c} {s}s are at the {p}? ASSISTANT: There are {n} {c} {s}s.</s>"
             for c in ("red", "green", "blue") for s in ("circle", "square") for p in ("top", "left") for n in range(7)]
    path.write_text("\n".join(lines * 10) + "\n")
    return path


def test_tiny_tokenizer_follows_llama_conventions(corpus, tmp_path):
    train_tokenizer(corpus, tmp_path / "tok.model", vocab_size=400)
    tok = Tokenizer(tmp_path / "tok.model")
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"] and tok.vocab_size <= 400
    assert tok.encode("red circles") == [tok.sp.piece_to_id("▁red"), tok.sp.piece_to_id("▁circles")]  # merged words
    assert [tok.id_to_piece(i) for i in tok.encode("12", prefix=False)] == ["1", "2"]  # split digits
    text = "A red circle.</s>Ünseen 🦙 wörds, 3 of them!"
    assert tok.encode(text).count(tok.eos_id) == 1
    assert tok.decode(tok.encode(text)) == text.replace("</s>", "")  # byte fallback covers unseen characters
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.model"]  # no temporary file left behind


def test_tiny_tokenizer_is_deterministic(corpus, tmp_path):
    train_tokenizer(corpus, tmp_path / "a.model", vocab_size=400)
    train_tokenizer(corpus, tmp_path / "b.model", vocab_size=400)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def test_tiny_tokenizer_matches_the_slow_reference(corpus, tmp_path):
    train_tokenizer(corpus, tmp_path / "tok.model", vocab_size=400)
    tok, reference = Tokenizer(tmp_path / "tok.model"), slow_reference(tmp_path / "tok.model")
    for text in TEXTS + SPACE_TEXTS:
        assert tok.encode(text) == reference(text), text


def test_bad_tokenizer_files_are_clear_errors(tmp_path):
    from llava_min.errors import TokenizerError
    with pytest.raises(TokenizerError, match="nothere.model not found"):
        Tokenizer(tmp_path / "nothere.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model is not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")


def test_a_tokenizer_without_llamas_special_ids_is_a_tokenizer_error(corpus, tmp_path):
    import sentencepiece as spm
    from llava_min.errors import TokenizerError
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "swapped"), vocab_size=48,
                                   unk_id=0, bos_id=2, eos_id=1, pad_id=-1, minloglevel=2)  # <s> and </s> swapped
    with pytest.raises(TokenizerError, match="swapped.model: id 1 is '</s>', LLaMA's convention needs the bos token there"):
        Tokenizer(tmp_path / "swapped.model")
