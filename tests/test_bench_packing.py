"""tools/bench_packing.py runs (small shapes, one epoch a side) and reports what it measured; the
figure itself (MAX_LEN 2048) is taken by hand, see docs/PERFORMANCE.md."""
import json
import os
import subprocess
import sys

from tests.conftest import needs_lima_sample, needs_llama_tokenizer

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench_packing.py")


@needs_lima_sample
@needs_llama_tokenizer
def test_bench_packing_small_run(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, TOOL, "--max_len", "256", "--repeats", "1", "--microbatches", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["padded_rows"] == [32, 32] and all(r % 2 == 0 for r in result["packed_rows"])
    assert sum(result["packed_rows"]) < sum(result["padded_rows"])
    assert result["computed_over_real"]["packed"] < result["computed_over_real"]["padded"]
    assert result["speedup_paired_median"] > 0 and result["goal"].startswith(("met", "not met"))


def test_bench_packing_missing_assets_is_bad_input(tmp_path):
    # --data_dir given: the check does not depend on ../shared's sample being present
    proc = subprocess.run([sys.executable, TOOL, "--data_dir", str(tmp_path), "--tokenizer", str(tmp_path / "none.model")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "none.model does not exist" in proc.stderr
