"""The tiny benchmark runs anywhere and reports every row (timings are printed, never asserted)."""
import json

from llava_min.tools import bench


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
    assert rows[0]["flash_ours"] is True and "flash SDPA backend: yes" in printed


def test_flash_check_reports_a_step_no_flash_kernel_can_run():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def step():  # attention pinned to a backend this CPU lacks: torch finds no kernel
        q = torch.randn(1, 2, 8, 16)
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert bench.runs_on_flash(step) is False
    assert bench.runs_on_flash(lambda: F.scaled_dot_product_attention(*[torch.randn(1, 2, 8, 16)] * 3)) is True


def test_both_models_hold_the_same_weights():
    """The comparison is fair only if both sides compute the same function."""
    import torch
    ours, theirs = bench.build_pair("tiny", False, "cpu", torch.float32)
    ids, pixels = bench.inputs(ours.cfg, 2, 20, "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=pixels)[0],
                                   theirs(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=1e-4)
