"""The LLaMA / Vicuna tokenizer: sentencepiece BPE with LLaMA's conventions (unk 0, bos 1, eos 2).

Two details decide whether training ids match what LLaVA-1.5 was trained on (SPEC section 3):
- sentencepiece never maps the text `</s>` to id 2, so special-token strings are split out first and
  their ids inserted;
- Vicuna v1.5 uses transformers' `legacy=False`: one "▁" before the whole text, none after a special
  token (`</s>USER` -> `</s>`, `USER`). Sentencepiece's own dummy prefix is therefore switched off in
  the model we load, and the prefix is added by hand where it belongs.
"""
import os
import re
import tempfile
from pathlib import Path

import sentencepiece as spm

SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2}
SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL) + ")")


# ---------------------------------------------------------------- sentencepiece's model proto, by hand
# ModelProto field 3 is NormalizerSpec, whose field 3 is `add_dummy_prefix` (a bool). Editing the
# wire format directly saves a dependency on protobuf.

def _varint(data: bytes, i: int):
    shift = value = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _fields(data: bytes):
    """Yields (field number, wire type, raw bytes of the whole field) for a serialized message."""
    i = 0
    while i < len(data):
        start = i
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 2:
            length, i = _varint(data, i)
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield key >> 3, wire, data[start:i]


def _payload(field: bytes) -> bytes:
    _, i = _varint(field, 0)
    length, i = _varint(field, i)
    return field[i: i + length]


def without_dummy_prefix(model_proto: bytes) -> bytes:
    out = bytearray()
    for number, wire, raw in _fields(model_proto):
        if number == 3 and wire == 2:
            spec = b"".join(r for n, _, r in _fields(_payload(raw)) if n != 3) + b"\x18\x00"  # add_dummy_prefix = 0
            raw = b"\x1a" + _encode_varint(len(spec)) + spec
        out += raw
    return bytes(out)


# ---------------------------------------------------------------- the tokenizer

class Tokenizer:
    unk_id, bos_id, eos_id = 0, 1, 2
    pad_id = 0  # LLaMA has no pad token; training pads with unk (always masked)

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found")
        proto = spm.SentencePieceProcessor(model_file=str(path)).serialized_model_proto()
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(without_dummy_prefix(proto))
        self.vocab_size = self.sp.vocab_size()
        for text, i in SPECIAL.items():
            if self.sp.id_to_piece(i) != text:
                raise ValueError(f"{path}: id {i} is {self.sp.id_to_piece(i)!r}, LLaMA's convention needs {text!r}")

    def encode_piece(self, text: str, dummy_prefix: bool) -> list:
        """Sentencepiece on plain text (no special tokens), with or without the leading "▁"."""
        text = text.replace("▁", " ")
        if dummy_prefix:
            text = " " + text
        return self.sp.encode(text) if text else []

    def encode(self, text: str, bos: bool = False, eos: bool = False, prefix: bool = True) -> list:
        """transformers' LlamaTokenizer(legacy=False): "▁" before the text (unless `prefix=False`, for
        text that continues earlier text), none after a special token."""
        ids = [self.bos_id] if bos else []
        for i, part in enumerate(SPECIAL_RE.split(text)):
            if part in SPECIAL:
                ids.append(SPECIAL[part])
            elif part:
                ids += self.encode_piece(part, dummy_prefix=prefix and i == 0)
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Text of the ids; special tokens and ids outside the vocabulary (image slots) are left out, and
        the leading "▁" that encoding adds is dropped again."""
        text = self.sp.decode([i for i in ids if 2 < i < self.vocab_size])
        return text[1:] if text.startswith(" ") else text

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


def train_tokenizer(corpus_path, model_path, vocab_size: int) -> None:
    """A small LLaMA-style tokenizer for the toy world: BPE, byte fallback, split digits, unk/bos/eos
    at 0/1/2 and no pad, trained on the project's own text. Written atomically; deterministic."""
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        prefix = os.path.join(tmp, "tok")
        spm.SentencePieceTrainer.train(
            input=str(corpus_path), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
            input_sentence_size=200_000, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
            hard_vocab_limit=False)  # a small corpus may support fewer pieces than asked
        os.replace(prefix + ".model", model_path)
