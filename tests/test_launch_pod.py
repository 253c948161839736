"""tools/launch_pod.py --dry-run prints the create / install / run commands and runs nothing."""
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import launch_pod  # noqa: E402

ARGS = ["--name", "lima", "--zone", "us-central2-b", "--accelerator", "v4-256", "--model", "llama_65b",
        "--mesh", "v4_256", "--model_dir", "gs://b/run", "--init_checkpoint", "gs://b/ck", "--data_dir",
        "gs://b/tfds", "--tokenizer", "gs://b/ck/tokenizer.model", "--dry-run"]


def test_dry_run_prints_the_gcloud_commands(capsys):
    assert launch_pod.main(ARGS) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("gcloud compute tpus tpu-vm create lima --zone=us-central2-b --accelerator-type=v4-256")
    run = shlex.split(lines[2])
    assert run[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in run
    inner = shlex.split(run[-1].split("&&", 1)[1])
    assert inner[:4] == ["lima-train", "--gin_file=gin/models/llama_65b.gin", "--gin_file=gin/meshes/v4_256.gin",
                         "--gin_file=gin/runs/lima_sft.gin"]
    assert '--gin_bindings=INIT_CHECKPOINT="gs://b/ck"' in inner and "--model_dir=gs://b/run" in inner
    for name in ("llama_65b",):
        assert os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           "gin", "models", f"{name}.gin"))
