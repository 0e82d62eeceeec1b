"""Talk to a LLaVA model about an image (LLaVA Sec. 5.1, the multimodal chatbot).

    python chat.py --model runs/toy/full/stage2 --image data/toy/images/eval/000000.png
    python chat.py --model DIR --image IMG --prompt "What is in the image?"    # answer once and exit
    python chat.py --model ADAPTER --model-base BASE --image IMG                # a LoRA adapter on its base

In the chat: `/image PATH` starts a new conversation about another image, `/clear` forgets the
conversation, `/quit` (or Ctrl-D, or Ctrl-C at the prompt) leaves. Ctrl-C while an answer streams stops it
and returns to the prompt; that question and its partial answer are forgotten, so the history holds only
whole answers. The KV cache carries over between turns: a new turn prefills only the tokens that are new,
never the history.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from llava_min.checkpoint.peft import load_model, tokenizer_file
from llava_min.cli import default_device, device, existing, fraction, positive, run
from llava_min.conversation import TEMPLATES, check_template, stop_text, tokenize_prompt
from llava_min.conversation import cut_at, stop_at
from llava_min.checkpoint.configs import read_config
from llava_min.model.generate import generate
from llava_min.data.image import ImageSettings, image_input, load_image
from llava_min.errors import ImageError, InputError, OptionError
from llava_min.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PastContext(InputError):
    """A prompt longer than the model's context; the caller says what to do (only the chat has /clear)."""


def partial_marker(text: str, end) -> int:
    """How many of the text's last characters could be the start of the end marker (held back from the stream)."""
    return next((k for k in range(len(end or "") - 1, 0, -1) if text.endswith(end[:k])), 0)


class Chat:
    """One conversation: its turns, its image, and a KV cache holding everything already seen."""

    def __init__(self, model, tok, template: str, max_new_tokens=512, temperature=0.2, top_p=1.0, seed=0,
                 compile=False):
        self.model, self.tok, self.template, self.compile = model, tok, template, compile
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
        self.max_len = model.cfg.text.max_position_embeddings
        self.cache = model.new_cache(1, self.max_len)
        self.image, self.prefilled = None, 0  # the image as the model takes it (data.image.ImageInput)
        self.clear()

    def clear(self) -> None:
        self.turns, self.cached_ids = [], []
        self.cache.length = 0

    def set_image(self, path) -> None:
        """A new image starts a new conversation (raises ImageError with the file named)."""
        view = image_input(load_image(path), ImageSettings.of(self.model.cfg))
        param = next(self.model.parameters())
        self.image = dataclasses.replace(view, pixel_values=view.pixel_values.to(param.device, param.dtype))
        self.clear()

    def prompt_ids(self, turns) -> list:
        count = self.image.num_tokens if self.image is not None else 0
        return tokenize_prompt(turns, self.tok, self.template, num_image_tokens=count,
                               image_token_id=self.model.cfg.image_token_id, has_image=self.image is not None)

    def reuse(self, ids: list) -> int:
        """How many leading tokens of `ids` the cache already holds (never splitting the image)."""
        k = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            k += 1
        image = [i for i, t in enumerate(ids) if t == self.model.cfg.image_token_id]
        if image and image[0] < k <= image[-1]:
            k = image[0]
        return min(k, len(ids) - 1)  # at least one token to feed

    def ask(self, text: str, stream=None) -> str:
        """Answers one user turn; `stream(piece)` receives the reply's text as it is generated."""
        turns = self.turns + [{"from": "human", "value": text}]
        ids = self.prompt_ids(turns)
        if len(ids) + 1 > self.max_len:
            raise PastContext(f"the prompt is {len(ids)} tokens with the image and the conversation so far, the "
                              f"model's context is {self.max_len}")
        k = self.reuse(ids)
        try:
            return self.answer(turns, ids, k, stream)
        except KeyboardInterrupt:  # stopped mid-answer: the turn is forgotten, the cache trusted up to k only
            self.cached_ids = ids[:k]
            raise

    def answer(self, turns: list, ids: list, k: int, stream) -> str:
        """Generates the reply to `ids`, of which the cache holds the first k."""
        self.cache.length = k
        new = torch.tensor([ids[k:]], device=self.cache.k[0].device)
        has_image = bool((new == self.model.cfg.image_token_id).any())
        self.prefilled += new.shape[1]
        reply_ids, text, shown, end = [], "", "", stop_text(self.template)

        def on_token(token):
            nonlocal text
            reply_ids.append(int(token))
            text = cut_at(self.tok.decode([t for t in reply_ids if t != self.tok.eos_id]), end)
            # held back: a marker's start, and a character whose bytes have not all come (shown as U+FFFD)
            show(text[: len(text) - partial_marker(text, end)].rstrip("\ufffd"))

        def show(visible: str):
            nonlocal shown
            if stream is not None and len(visible) > len(shown):
                stream(visible[len(shown):])
            shown = visible
        budget = min(self.max_new_tokens, self.max_len - len(ids))
        generate(self.model, new, budget, temperature=self.temperature, top_p=self.top_p,
                 eos_id=self.model.cfg.text.eos_token_id, generator=self.generator, cache=self.cache,
                 on_token=on_token, compile=self.compile, stop=stop_at(self.tok, end),
                 pixel_values=self.image.pixel_values if has_image else None,
                 image_sizes=[self.image.size] if has_image else None)
        self.cached_ids = ids + reply_ids[:-1]  # the last sampled token was never fed back
        show(text)  # what was held back, if the budget ended the reply
        reply = text.strip()
        self.turns = turns + [{"from": "gpt", "value": reply}]
        return reply


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=existing("dir"), required=True, help="any layout llava_min.load accepts, or a LoRA adapter")
    p.add_argument("--image", type=Path)
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--temperature", type=positive(float, zero_ok=True), default=0.2, help="0 = greedy")
    p.add_argument("--top-p", type=fraction, default=1.0)
    p.add_argument("--max-new-tokens", type=positive(), default=512)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", type=device, default=default_device(), help="default: cuda where there is one")
    p.add_argument("--tokenizer", type=existing(), help="default: MODEL/tokenizer.model")
    p.add_argument("--vision", type=existing("dir"),
                   help="CLIP directory for official checkpoints, if not the one named")
    p.add_argument("--llm", type=existing("dir"), help="LLM directory for a stage-1 projector checkpoint")
    p.add_argument("--model-base", type=existing("dir"), help="MODEL is a LoRA adapter (ours, peft's, the official "
                   "release): the model it goes on (default: the one its adapter_config.json names)")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="conversation template (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="decode through the compiled, CUDA-graphed step (it compiles first)")
    args = p.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        p.error("--prompt is empty: give a question, or leave --prompt out to chat")
    return args


def open_chat(args) -> Chat:
    tokenizer = args.tokenizer or tokenizer_file(args.model, args.model_base)
    if not Path(tokenizer).is_file():
        read_config(args.model)  # a directory that is no model at all says that first
        sys.exit(f"no tokenizer at {tokenizer}: pass --tokenizer PATH/tokenizer.model")
    model = load_model(args.model, args.model_base, dtype=DTYPES.get(args.dtype), device=args.device,
                       vision_path=args.vision, llm_path=args.llm)
    try:
        template = check_template(args.template or model.cfg.template)
    except OptionError as e:  # a template the checkpoint names but llava-min lacks: say which checkpoint
        sys.exit(f"{args.model}: {e}")
    return Chat(model, Tokenizer(tokenizer), template, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                args.compile)


def say(chat: Chat, text: str) -> None:
    try:
        chat.ask(text, stream=lambda piece: print(piece, end="", flush=True))
    except PastContext as e:
        print(f"[{e}: {'/clear to start over, or ' if chat.turns else ''}ask something shorter]", end="")
    except InputError as e:
        print(f"[{e}]", end="")
    except KeyboardInterrupt:
        print(" [stopped; this question and its answer are forgotten]", end="")
    print()


def command(chat: Chat, line: str) -> bool:
    """Handles a /command; False means quit."""
    name, _, arg = line.partition(" ")
    if name == "/quit":
        return False
    if name == "/clear":
        chat.clear()
        print("[conversation cleared]")
    elif name == "/image" and not arg.strip():
        print("[usage: /image PATH, a new conversation about the image at PATH]")
    elif name == "/image":
        try:
            chat.set_image(Path(arg.strip()).expanduser())
            print(f"[new conversation about {arg.strip()}]")
        except (OSError, ImageError) as e:
            print(f"[{e}]")
    else:
        print("[commands: /image PATH, /clear, /quit]")
    return True


def user_lines():
    """Lines typed at a `USER:` prompt, or read from a pipe (scripts, tests)."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("USER: ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave
            print()
            return


def main(argv=None):
    args = parse_args(argv)
    chat = open_chat(args)
    if args.image is not None:
        try:
            chat.set_image(args.image)
        except (OSError, ImageError) as e:
            if args.prompt is not None:
                sys.exit(str(e))
            print(f"[{e}] (chatting without an image; /image PATH to add one)")
    if args.prompt is not None:
        try:
            chat.ask(args.prompt, stream=lambda piece: print(piece, end="", flush=True))
        except PastContext as e:  # no answer, so not a success
            sys.exit(f"--prompt: {e}: shorten the prompt, or use a model with a longer context")
        print()
        return
    print("[/image PATH: new image, /clear: forget the conversation, /quit: leave; Ctrl-C stops an answer]")
    converse(chat, user_lines())


def converse(chat: Chat, lines) -> None:
    """The chat's loop over typed lines: /commands, or a question answered as it streams."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not command(chat, line):
                break
            continue
        print("ASSISTANT: ", end="", flush=True)
        say(chat, line)


if __name__ == "__main__":
    run(main)
