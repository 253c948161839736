"""lima-train: LIMA supervised fine-tuning (§3) on any mesh, resumable bit for bit.

    lima-train --gin_file=gin/models/llama_65b.gin --gin_file=gin/meshes/v4_256.gin \\
               --gin_file=gin/runs/lima_sft.gin --gin_bindings="INIT_CHECKPOINT='gs://.../llama-65b'" \\
               --model_dir=gs://.../run

Gin files are looked up as given, then under the project's gin/ (runs/lima_sft.gin). Rerunning the
same command resumes from the latest checkpoint; on a finished run it says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from lima_jax.cli.errors import INPUT_ERRORS, input_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lima-train", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable; later wins)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="gin binding, e.g. NUM_EPOCHS=3")
    parser.add_argument("--model_dir", required=True, help="where checkpoints, config and TensorBoard go")
    parser.add_argument("--coordinator_address", help="multi-host: host:port of process 0 (not on Cloud TPU)")
    parser.add_argument("--num_processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process_id", type=int, help="multi-host: this process's index")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.gin_file:
        parser.error("give at least one --gin_file (e.g. runs/demo.gin, or a model, a mesh and runs/lima_sft.gin)")
    try:
        from lima_jax import gin_config

        gin_files = [gin_config.resolve(f) for f in args.gin_file]  # before the slow imports below
        import gin

        from lima_jax import mesh as mesh_lib, train

        gin_config.parse(gin_files, args.gin_bindings)
        if args.coordinator_address:
            gin.bind_parameter("initialize_distributed.coordinator_address", args.coordinator_address)
            gin.bind_parameter("initialize_distributed.num_processes", args.num_processes)
            gin.bind_parameter("initialize_distributed.process_id", args.process_id)
        mesh_lib.initialize_distributed()
        train.train(args.model_dir)
    except INPUT_ERRORS as e:
        return input_error(parser.prog, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
