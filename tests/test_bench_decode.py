"""tools/bench_decode.py: the LIMA-lengths workload's budgets and static batches, and one small run of
the tool (the 58M figures are measured by hand)."""
import os
import sys

from tests.conftest import needs_lima_sample, needs_llama_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import bench_decode  # noqa: E402


@needs_lima_sample
@needs_llama_tokenizer
def test_lima_budgets_are_answer_lengths_divided_and_clipped():
    budgets = bench_decode.lima_budgets(32)
    assert len(budgets) == 32 and min(budgets) == 8 and max(budgets) == 512  # both clip ends occur
    assert budgets[:6] == [102, 131, 84, 148, 64, 83]
    assert bench_decode.lima_budgets(2, divisor=1, high=10_000) == [410, 526]  # 410 // 4 = 102, 526 // 4 = 131


def test_static_batches_run_to_their_longest_budget():
    assert bench_decode.static_batch_steps([5, 9, 2, 7, 1], 2) == [9, 7, 1]


@needs_lima_sample
@needs_llama_tokenizer
def test_tool_reports_the_ratio_and_occupancy(capsys):
    results = bench_decode.main(["--workload", "lima", "--tiny", "--num_prompts", "8", "--slots", "4",
                                 "--budget_divisor", "16", "--repeats", "1", "--batch_sizes", "2", "--new_tokens", "8"])
    out = capsys.readouterr().out
    lima = results["lima"]
    assert lima["budgets"] == bench_decode.lima_budgets(8, divisor=16)
    # Budgets 16..37 in 4 slots, longest first: the tail idles a little.
    assert 0.8 < lima["occupancy"] <= 1.0 and lima["ratio"] > 0
    assert f"ratio {lima['ratio']:.2f}x" in out and f"occupancy {lima['occupancy']:.1%}" in out
    assert "batch 2: ours" in out and results["batch 2"]["ours_tps"] > 0


@needs_lima_sample
@needs_llama_tokenizer
def test_recorded_answer_lengths_are_the_samples():
    """The lengths tools/gpu_check.py uses where the sample or sentencepiece is absent."""
    assert list(bench_decode.LIMA_ANSWER_LENGTHS) == bench_decode.answer_lengths(32)
    assert bench_decode.budgets_from_lengths(bench_decode.LIMA_ANSWER_LENGTHS) == bench_decode.lima_budgets(32)
