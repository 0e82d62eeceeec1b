"""The LLaMA / Vicuna tokenizer: sentencepiece BPE with LLaMA's conventions (unk 0, bos 1, eos 2, no pad).

Two details decide whether our ids are the ids LLaVA-1.5 was trained on:
- sentencepiece never maps the text `</s>` to id 2 (it gives `▁</`, `s`, `>`), so the special-token
  strings are split out first and their ids inserted;
- Vicuna v1.5 uses transformers' slow LlamaTokenizer with `legacy=False`: one "▁" before the whole
  text, none after a special token (`</s>USER` -> `</s>`, `USER`). We switch sentencepiece's own dummy
  prefix off in the model we load and add the "▁" by hand where it belongs.
Note: the released LLaVA-1.5 weights were trained with transformers 4.31, whose first `legacy=False`
gave `</s>`, `US`, `ER` there instead (it stripped the "▁" off `▁US`); we follow the later, settled
behaviour of transformers 4.37, the version the official trainer pins. Only the token after each
`</s>` differs.

The special tokens are the model's own pieces that are not text (unknown, control and user-defined:
LLaMA's `<unk>`, `<s>`, `</s>`; Yi's `<|startoftext|>`, `<|endoftext|>`, ChatML's `<|im_start|>`,
`<|im_end|>`), each one id, as transformers' slow tokenizer splits out its added tokens.
"""
import io
import re
from pathlib import Path

import sentencepiece as spm

from .errors import TokenizerError
from .files import atomic_write

NOT_TEXT = {2, 3, 4}  # sentencepiece ModelProto.SentencePiece.Type: UNKNOWN, CONTROL, USER_DEFINED


# ---------------------------------------------------------------- add_dummy_prefix = false, by hand
# ModelProto field 3 is the NormalizerSpec message, whose field 3 is the bool `add_dummy_prefix`.
# Protobuf keeps the last value of a repeated scalar, so appending `add_dummy_prefix: 0` to the
# normalizer spec overrides it. Editing the wire format saves a runtime dependency on protobuf.

def _varint(data: bytes, i: int) -> tuple:
    shift = value = 0
    while True:
        value |= (data[i] & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if data[i - 1] < 0x80:
            return value, i


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _fields(message: bytes):
    """(key, start, value start, end) of each field of a serialized protobuf message."""
    i = 0
    while i < len(message):
        key, j = _varint(message, i)
        wire = key & 7
        if wire == 0:
            _, end = _varint(message, j)
        elif wire == 2:
            length, j = _varint(message, j)
            end = j + length
        elif wire in (1, 5):
            end = j + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"not a sentencepiece model: protobuf wire type {wire}")
        yield key, i, j, end
        i = end


def without_dummy_prefix(model_proto: bytes) -> bytes:
    """The serialized sentencepiece model with `normalizer_spec.add_dummy_prefix` set to false."""
    out = bytearray()
    for key, start, j, end in _fields(model_proto):
        if key == (3 << 3 | 2):  # normalizer_spec
            spec = model_proto[j:end] + b"\x18\x00"  # field 3 (add_dummy_prefix), varint 0
            out += b"\x1a" + _encode_varint(len(spec)) + spec
        else:
            out += model_proto[start:end]
    return bytes(out)


def piece_types(model_proto: bytes) -> list:
    """The type of each piece (ModelProto field 1, the pieces; their field 3, the type, NORMAL = 1 if absent)."""
    types = []
    for key, _, j, end in _fields(model_proto):
        if key == (1 << 3 | 2):
            piece = model_proto[j:end]
            fields = {k: v for k, _, v, _ in _fields(piece)}
            types.append(_varint(piece, fields[3 << 3])[0] if (3 << 3) in fields else 1)
    return types


# ---------------------------------------------------------------- the tokenizer

class Tokenizer:
    unk_id, bos_id, eos_id = 0, 1, 2
    pad_id = 0  # LLaMA has no pad token; training pads with unk (always masked, never attended)

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model {path} not found")
        try:
            proto = spm.SentencePieceProcessor(model_file=str(path)).serialized_model_proto()
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path} is not a sentencepiece model: {e}") from e
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(without_dummy_prefix(proto))
        self.vocab_size = self.sp.vocab_size()
        self.special = {self.sp.id_to_piece(i): i for i, t in enumerate(piece_types(proto)) if t in NOT_TEXT}
        declared = {"unk": self.sp.unk_id(), "bos": self.sp.bos_id(), "eos": self.sp.eos_id()}
        for name, i in (("unk", 0), ("bos", 1), ("eos", 2)):  # by role, not by text: Yi's bos is <|startoftext|>
            if declared[name] != i:
                raise TokenizerError(f"{path}: id {i} is {self.sp.id_to_piece(i)!r}, LLaMA's convention needs the "
                                     f"{name} token there")
        longest_first = sorted(self.special, key=len, reverse=True)  # `<|im_end|>` before a piece it contains
        self.special_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def encode_text(self, text: str, dummy_prefix: bool) -> list:
        """Sentencepiece on text without special tokens, with or without the leading "▁"."""
        text = text.replace("▁", " ")  # a literal "▁" is a space to LLaMA's tokenizer
        return self.sp.encode(" " + text if dummy_prefix else text) if text else []

    def encode(self, text: str, bos: bool = False, eos: bool = False, prefix: bool = True) -> list:
        """transformers' slow LlamaTokenizer(legacy=False): "▁" before the text, none after a special
        token. `prefix=False` is for text that continues earlier text (a span of a longer prompt)."""
        ids = [self.bos_id] if bos else []
        for i, part in enumerate(self.special_re.split(text)):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids += self.encode_text(part, dummy_prefix=prefix and i == 0)
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """The text of `ids`. Special tokens and ids outside the vocabulary (image tokens) are left
        out, and the "▁" that encoding put in front of the text is dropped again."""
        special = set(self.special.values())
        text = self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in special])
        return text.removeprefix(" ")

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def train_tokenizer(corpus_path, model_path, vocab_size: int) -> None:
    """A small LLaMA-style tokenizer for the toy world, trained on the project's own text: BPE, byte
    fallback, split digits, unk/bos/eos = 0/1/2, no pad, dummy prefix, whitespace kept as it is.
    Deterministic: one thread, the first `input_sentence_size` lines in file order (no sampling), and
    the model is written from memory, so the same corpus gives the same bytes. Written atomically."""
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(corpus_path), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", input_sentence_size=1_000_000, shuffle_input_sentence=False,
        num_threads=1, minloglevel=2,
        hard_vocab_limit=False)  # a small corpus may support fewer pieces than asked
    atomic_write(model_path, lambda tmp: tmp.write_bytes(model.getvalue()))
