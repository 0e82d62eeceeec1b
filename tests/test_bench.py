"""The tiny benchmark runs anywhere and reports every row (timings are printed, never asserted)."""
import json

from llava_min import bench


def test_tiny_benchmark_reports_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--config", "tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    names = [r["row"] for r in rows]
    assert names == ["train step (tokens/s)", "prefill latency (ms)", "decode batch 1 (tokens/s)",
                     "decode batch 8 (tokens/s)"]
    for r in rows:
        assert r["ours"] > 0 and r["transformers"] > 0
        assert r["row"] in printed
    assert printed.count("x |") == len(rows)  # a ratio on every row


def test_both_models_hold_the_same_weights():
    """The comparison is fair only if both sides compute the same function."""
    import torch
    ours, theirs = bench.build_pair("tiny", False, "cpu", torch.float32)
    ids, pixels = bench.inputs(ours.cfg, 2, 20, "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=pixels)[0],
                                   theirs(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=1e-4)
