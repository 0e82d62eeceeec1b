"""Evaluation the way the papers score: short answers (VQAv2 / GQA style, LLaVA-1.5 Sec. 3.2's
response-format prompt), multiple choice (ScienceQA, LLaVA Sec. 5.2) and LLaVA-Bench's judged
relative score (LLaVA Sec. 5.1). Greedy decoding, batched with left padding.

    python -m llava_min.eval --model DIR --data eval.json --image-folder IMAGES [--blind] [--out results.json]
    python -m llava_min.eval --model DIR --bench bench.json --image-folder IMAGES --api-base URL --judge-model M
"""
import argparse
import json


from ..checkpoint.peft import load_model, tokenizer_file
from ..cli import default_device, device, existing, positive, run, writable
from ..conversation import check_template
from ..data.teacher import ChatClient
from ..errors import OptionError
from ..files import write_text
from ..tokenizer import Tokenizer
from .llava_bench import llava_bench
from .score import evaluate, print_table


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llava_min.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=existing("dir"), required=True)
    p.add_argument("--model-base", type=existing("dir"), help="MODEL is a LoRA adapter: the model it goes on")
    p.add_argument("--data", type=existing(), help="eval.json: short-answer and multiple-choice records")
    p.add_argument("--bench", type=existing(), help="LLaVA-Bench style bench.json, scored by a judge")
    p.add_argument("--image-folder", type=existing("dir"))
    p.add_argument("--blind", action="store_true", help="also answer without the image, to see how much it looks")
    p.add_argument("--batch-size", type=positive(), default=32)
    p.add_argument("--limit", type=positive())
    p.add_argument("--api-base", default="https://api.openai.com/v1")
    p.add_argument("--judge-model", default="gpt-4o-mini")
    p.add_argument("--device", type=device, default=default_device(), help="default: cuda where there is one")
    p.add_argument("--out", type=writable(), help="write the results as JSON here")
    args = p.parse_args(argv)
    if not args.data and not args.bench:
        p.error("give --data and/or --bench")
    if args.bench:  # a judge that does not answer is named now, not after every answer is generated
        judge = ChatClient(args.api_base, args.judge_model, temperature=0.2)  # as the official eval_gpt_review
        judge.check_reachable()
    model = load_model(args.model, args.model_base, device=args.device)
    try:
        check_template(model.cfg.template)
    except OptionError as e:  # a template the checkpoint names but llava-min lacks: say which checkpoint
        raise SystemExit(f"{args.model}: {e}")
    tok = Tokenizer(tokenizer_file(args.model, args.model_base))
    results = {}
    if args.data:
        results.update(evaluate(model, tok, args.data, args.image_folder, batch_size=args.batch_size, limit=args.limit,
                                progress=True))
        if args.blind:
            results["blind_scores"] = evaluate(model, tok, args.data, args.image_folder, blind=True,
                                               batch_size=args.batch_size, limit=args.limit)["scores"]
        print_table(results["scores"], results.get("blind_scores"))
    if args.bench:
        results.update(llava_bench(model, tok, args.bench, args.image_folder, judge))
        for category, s in results["llava_bench"].items():
            print(f"LLaVA-Bench {category:<14} relative {s['relative']:>6.1f}  (model {s['model']}, reference "
                  f"{s['reference']}, n {s['n']})")
    if args.out:
        write_text(args.out, json.dumps(results, indent=2))  # (a full disk: one line naming --out)


if __name__ == "__main__":
    run(main)
