"""Launch lima-train on a Cloud TPU pod slice: create the TPU VM, install lima-jax on every worker, run.

    python tools/launch_pod.py --name lima-65b --zone us-central2-b --accelerator v4-256 \
        --model llama_65b --mesh v4_256 --model_dir gs://BUCKET/runs/lima-65b \
        --init_checkpoint gs://BUCKET/ckpt/llama-65b --data_dir gs://BUCKET/tfds \
        --tokenizer gs://BUCKET/ckpt/llama-65b/tokenizer.model --dry-run

--dry-run prints the gcloud commands instead of running them. The run command is the same on every
worker (`--worker=all`); JAX finds its peers on a TPU slice by itself (jax.distributed.initialize with
no arguments), and each host reads only its block of every global batch. A preempted run is resumed by
launching the same command again: lima-train continues from the latest checkpoint in model_dir.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Optional, Sequence

RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite"}


def commands(args: argparse.Namespace) -> list[list[str]]:
    family = args.accelerator.split("-")[0]
    version = args.runtime_version or RUNTIME_VERSIONS.get(family)
    if version is None:
        raise ValueError(f"--accelerator {args.accelerator!r}: no default runtime version; pass --runtime_version")
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    create = tpu + ["create", args.name, *where, f"--accelerator-type={args.accelerator}", f"--version={version}"]
    if args.spot:
        create.append("--spot")
    install = (f"git clone {shlex.quote(args.repo)} lima-jax 2>/dev/null || git -C lima-jax pull; "
               f"cd lima-jax && git checkout {shlex.quote(args.ref)} && python3 -m pip install -q -e '.[tpu]'")
    bindings = [f'INIT_CHECKPOINT="{args.init_checkpoint}"', f'DATA_DIR="{args.data_dir}"',
                f'TOKENIZER="{args.tokenizer}"', *args.gin_bindings]
    train = ["lima-train", f"--gin_file=gin/models/{args.model}.gin", f"--gin_file=gin/meshes/{args.mesh}.gin",
             f"--gin_file=gin/runs/{args.run}.gin", *[f"--gin_bindings={b}" for b in bindings],
             f"--model_dir={args.model_dir}"]
    run = "cd lima-jax && " + " ".join(shlex.quote(a) for a in train)
    ssh = tpu + ["ssh", args.name, *where, "--worker=all"]
    out = [create] if not args.skip_create else []
    out += [ssh + ["--command", install], ssh + ["--command", run]]
    if args.delete_after:
        out.append(tpu + ["delete", args.name, *where, "--quiet"])
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project")
    p.add_argument("--accelerator", required=True, help="e.g. v4-256, v5p-128")
    p.add_argument("--runtime_version", help="TPU VM image (default by TPU family)")
    p.add_argument("--spot", action="store_true", help="a preemptible (spot) slice; rerun this to resume")
    p.add_argument("--skip_create", action="store_true", help="the slice exists already")
    p.add_argument("--delete_after", action="store_true", help="delete the slice when training ends")
    p.add_argument("--repo", default="https://github.com/lima-jax/lima-jax.git", help="git URL of lima-jax")
    p.add_argument("--ref", default="main", help="git branch/tag/commit to install")
    p.add_argument("--model", required=True, help="gin/models/<model>.gin, e.g. llama_65b")
    p.add_argument("--mesh", required=True, help="gin/meshes/<mesh>.gin, e.g. v4_256")
    p.add_argument("--run", default="lima_sft", help="gin/runs/<run>.gin")
    p.add_argument("--model_dir", required=True, help="gs:// path for checkpoints and TensorBoard")
    p.add_argument("--init_checkpoint", required=True, help="converted checkpoint (lima-convert hf-to-orbax)")
    p.add_argument("--data_dir", required=True, help="TFDS data dir (lima-data build)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model path")
    p.add_argument("--gin_bindings", action="append", default=[], help="extra bindings, e.g. NUM_EPOCHS=10")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the gcloud commands, run nothing")
    args = p.parse_args(argv)
    for cmd in commands(args):
        print(" ".join(shlex.quote(c) for c in cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
