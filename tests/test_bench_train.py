"""tools/bench_train.py's statistics: the bootstrap interval of the speedup and its verdict on the goal
(the benchmark itself is run by hand, not in the suite)."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import bench_train  # noqa: E402


def test_interval_brackets_the_ratio_of_medians_and_narrows_with_less_noise():
    rng = np.random.default_rng(1)
    ours = 4.0 + rng.uniform(0, 1.0, 20)
    theirs = 4.4 + rng.uniform(0, 1.0, 20)
    low, high = bench_train.speedup_interval(list(ours), list(theirs))
    point = np.median(theirs) / np.median(ours)
    assert low <= point <= high
    quiet_low, quiet_high = bench_train.speedup_interval(list(4.0 + (ours - 4.0) / 10), list(4.4 + (theirs - 4.4) / 10))
    assert quiet_high - quiet_low < (high - low) / 5


def test_verdict_needs_the_whole_interval_on_one_side_of_the_goal():
    assert bench_train.verdict((1.02, 1.10)).startswith("met")
    assert bench_train.verdict((1.0, 1.10)).startswith("met")
    assert bench_train.verdict((0.90, 0.99)).startswith("not met")
    assert bench_train.verdict((0.97, 1.05)).startswith("undecided")
    assert "90% interval" in bench_train.verdict((0.97, 1.05), level=0.9)


def test_clearly_faster_steps_are_met_and_equal_steps_undecided():
    rng = np.random.default_rng(2)
    noise = list(rng.uniform(0, 0.5, 20))
    ours = [4.0 + x for x in noise]
    assert bench_train.verdict(bench_train.speedup_interval(ours, [5.0 + x for x in rng.permutation(noise)])).startswith("met")
    assert bench_train.verdict(bench_train.speedup_interval(ours, [4.0 + x for x in rng.permutation(noise)])).startswith("undecided")


def test_cpu_description_names_the_model_and_widest_isa(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor @ 2.50GHz\n"
                    "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n\nprocessor\t: 1\n")
    assert bench_train.cpu_description(str(info)) == "Intel(R) Xeon(R) Processor @ 2.50GHz, AVX-512"
    info.write_text("model name\t: AMD EPYC 7B13\nflags\t\t: fpu avx avx2 fma\n")
    assert bench_train.cpu_description(str(info)) == "AMD EPYC 7B13, AVX2"
    assert bench_train.cpu_description(str(tmp_path / "absent")) == "unknown"
