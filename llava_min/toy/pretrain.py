"""The toy's stages before LLaVA's two: LLaVA starts from a pretrained CLIP and a pretrained LLM, so the
toy world first trains its tokenizer, a tiny CLIP (contrastive image-caption pretraining) and a tiny
LLaMA (next-token pretraining on text)."""
import dataclasses
from pathlib import Path

import torch

from ..data.dataset import DataError, bad_records, check_record, checked_records, record_id
from ..data.image import ImageError, load_image, preprocess
from ..model.clip import VisionTower
from ..model.llama import Llama
from ..checkpoint.save import save_llama, save_vision
from ..train.settings import StageRun
from ..train.stages import num_targets, run_stage
from ..tokenizer import Tokenizer, train_tokenizer
from .contrastive import ContrastiveCLIP
from .presets import ToyPreset
from .questions import CHOICE_PROMPT, SHORT_PROMPT


def lm_loss(model, batch) -> torch.Tensor:
    _, loss = model(batch["input_ids"], labels=batch["labels"], return_logits=False)
    return loss * num_targets(batch)


def clip_loss(model, batch) -> torch.Tensor:
    return model(batch["pixel_values"], batch["input_ids"], batch["eot_index"])


class PackedText(torch.utils.data.Dataset):
    """`corpus.txt` (one document per line) as BOS doc EOS BOS doc EOS ..., cut into equal windows; `skip`:
    documents holding any of these strings are left out."""

    def __init__(self, corpus_path, tok, seq_len: int, skip: tuple = ()):
        ids = []
        for line in Path(corpus_path).read_text(encoding="utf-8").splitlines():
            if line.strip() and not any(s in line for s in skip):
                ids += tok.encode(line.strip(), bos=True, eos=True)
        self.windows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return self.windows[i]


def collate_text(windows) -> dict:
    ids = torch.stack(windows)
    return {"input_ids": ids, "labels": ids}


class CaptionPairs(torch.utils.data.Dataset):
    """(image, caption) pairs from an LLaVA-format caption file (the stage-1 `pretrain.json`)."""

    def __init__(self, data_path, image_folder, tok, image_size: int, max_len: int = 64):
        """Every record is checked here, its image file too; bad ones stop the run naming the file and the
        records (this toy stage has no --on-error skip: its data is generated)."""
        def check(r):
            if not isinstance(r, dict) or "image" not in r or not r.get("conversations"):
                raise DataError("a caption pair needs 'image' and 'conversations'")
            check_record(r, "plain")
        good, bad = checked_records(data_path, image_folder, check)
        if bad:
            raise bad_records(data_path, bad, len(good) + len(bad))
        self.data_path, self.records = data_path, [r for _, r in good]
        self.image_folder, self.tok, self.image_size, self.max_len = image_folder, tok, image_size, max_len

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        record = self.records[i]
        caption = record["conversations"][-1]["value"]
        ids = self.tok.encode(caption, bos=True)[: self.max_len - 1] + [self.tok.eos_id]
        try:
            image = load_image(record["image"], image_folder=self.image_folder)
        except ImageError as e:
            raise DataError(f"{self.data_path}: record {record_id(i, record)}: bad image: {e}") from e
        return torch.tensor(ids), preprocess(image, size=self.image_size, aspect="crop")


def collate_pairs(pairs, pad_id: int = 0) -> dict:
    lengths = torch.tensor([len(ids) for ids, _ in pairs])
    ids = torch.full((len(pairs), int(lengths.max())), pad_id)
    for row, (caption, _) in enumerate(pairs):
        ids[row, : len(caption)] = caption
    return {"input_ids": ids, "eot_index": lengths - 1, "pixel_values": torch.stack([p for _, p in pairs])}


def stage_tokenizer(corpus: Path, out: Path, toy: ToyPreset):
    """The toy's sentencepiece model, trained on the world's text (corpus.txt) and written to `out` (a file)."""
    train_tokenizer(corpus, out, toy.vocab_size)


def stage_clip(run: StageRun, toy: ToyPreset, tokenizer: Path, image_folder: Path):
    tok = Tokenizer(tokenizer)
    text_cfg = dataclasses.replace(toy.clip_text, vocab_size=tok.vocab_size)
    torch.manual_seed(run.loop.seed)
    model = ContrastiveCLIP(VisionTower(toy.vision, select_layer=-1), text_cfg, feature_layer=toy.recipe.select_layer,
                            decorrelation=toy.clip_decorrelation).to(run.loop.device)
    data = CaptionPairs(run.data, image_folder, tok, toy.vision.image_size)
    groups = [{"params": list(model.parameters())}]
    return run_stage(run, model, groups, data, collate_pairs, clip_loss, lambda batch: 1,
                     lambda out: save_vision(model.vision_tower, out))


def stage_lm(run: StageRun, toy: ToyPreset, tokenizer: Path):
    tok = Tokenizer(tokenizer)
    torch.manual_seed(run.loop.seed)
    model = Llama(dataclasses.replace(toy.text, vocab_size=tok.vocab_size)).to(run.loop.device)
    # An LM that has learned to guess the short answers blind is slow to learn to look (toy-research.md).
    skip = () if toy.lm_sees_answer_formats else (SHORT_PROMPT.strip(), CHOICE_PROMPT)
    data = PackedText(run.data, tok, toy.lm_seq_len, skip)
    groups = [{"params": list(model.parameters())}]
    return run_stage(run, model, groups, data, collate_text, lm_loss, num_targets,
                     lambda out: save_llama(model, out, tokenizer))
