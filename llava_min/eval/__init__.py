"""Evaluation as the papers score it: batched greedy answers (answer.py), short-answer and multiple-choice
scoring (score.py), LLaVA-Bench's judged relative score (llava_bench.py); `python -m llava_min.eval`."""
