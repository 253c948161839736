"""lima-aot: will this LIMA step fit that TPU slice? Compiled by the TPU compiler, on this machine."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from lima_jax.cli.errors import INPUT_ERRORS, input_error
from lima_jax.config import REMAT_POLICIES

# AOT compiles for TPU; everything else JAX does here must stay on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: Optional[list[str]] = None) -> int:
    from lima_jax import aot, plan

    parser = argparse.ArgumentParser(
        prog="lima-aot", description=__doc__,
        epilog="Needs the 'tpu' extra (pip install 'lima-jax[tpu]'). Known slices: " + ", ".join(aot.SLICES))
    parser.add_argument("--model", default="llama_65b", help="gin/models/<model>.gin (default llama_65b)")
    parser.add_argument("--topology", default="v4-256", help="Cloud TPU slice name, e.g. v4-256, v5p-8, v5e-16")
    parser.add_argument("--mesh", help="mesh sizes, e.g. data=1,fsdp=64,tensor=4 (default: FSDP over all devices)")
    parser.add_argument("--batch_size", type=int, default=32, help="global batch in sequences (LIMA: 32)")
    parser.add_argument("--seq_len", type=int, default=2048, help="context length (LIMA: 2048)")
    parser.add_argument("--remat", choices=REMAT_POLICIES,
                        help="override the model gin's remat policy")
    parser.add_argument("--step", choices=["train", "decode"], default="train")
    parser.add_argument("--rows", type=int,
                        help="rows of the train step's batch (default: the packed bucket a LIMA run uses most, "
                             "from --data_dir when given, else from LIMA's mean example length; batch_size with "
                             "PACKING=False)")
    parser.add_argument("--data_dir", help="TFDS data (lima-data build) whose packed buckets give --rows, as lima-train "
                                           "would choose them on this mesh (needs --tokenizer)")
    parser.add_argument("--tokenizer", help="the tokenizer.model the data is tokenized with")
    parser.add_argument("--mixture", default="lima_1k", help="mixture of --data_dir (default lima_1k)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="extra gin binding (repeatable)")
    parser.add_argument("--json", help="write the report here (JSON)")
    parser.add_argument("--plan", action="store_true",
                        help="compile candidates (remat x mesh split x microbatches), print their fit and predicted "
                             "speed, pick the fastest that fits and write it as a gin file (--out)")
    parser.add_argument("--out", default="plan.gin", help="the plan's gin file (default plan.gin); lima-train takes "
                                                          "it after the other gin files")
    parser.add_argument("--remats", help="comma-separated remat policies the plan tries (default: "
                                         f"{','.join(plan.PLAN_REMATS)})")
    parser.add_argument("--table", action="store_true",
                        help="print the README fit table: smallest v4 / v5p slice for 7B-65B and the plan's predicted "
                             "speed there (slow: hours of compiles)")
    args = parser.parse_args(argv)
    if args.topology.startswith("cpu-"):  # this machine's CPU devices, before JAX starts its backend
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.topology[4:]}".strip()
    try:
        if args.plan:
            return _plan(args, parser.prog)
        if args.table:
            table = plan.fit_table(args.batch_size, args.seq_len, log=lambda s: print(s, file=sys.stderr, flush=True))
            print(table)
            return 0
        if args.data_dir and not args.tokenizer:
            raise ValueError("--data_dir needs --tokenizer (the tokenizer.model it is tokenized with)")
        input_for = None
        if args.data_dir:
            def input_for(row_multiple, seed):
                from data_pipeline.inputs import TrainInput

                return TrainInput(args.mixture, args.data_dir, args.tokenizer, args.batch_size, args.seq_len, seed,
                                  packing=True, row_multiple=row_multiple)
        report = aot.compile_step(args.model, args.topology, args.mesh, args.batch_size, args.seq_len, args.remat,
                                  args.step, args.gin_bindings, rows=args.rows, input_for=input_for)
    except (*INPUT_ERRORS, RuntimeError) as e:  # RuntimeError: no TPU compiler here (the 'tpu' extra)
        return input_error(parser.prog, e)
    print(aot.describe(report))
    if args.json:
        aot.write_json(args.json, report)
    return 0


def _plan(args, prog: str) -> int:
    from lima_jax import aot, plan

    remats = tuple(r.strip() for r in args.remats.split(",")) if args.remats else plan.PLAN_REMATS
    unknown = [r for r in remats if r not in REMAT_POLICIES]
    if unknown:
        raise ValueError(f"--remats: unknown policy {unknown[0]!r}; known: {', '.join(REMAT_POLICIES)}")
    meshes = None
    if args.mesh:
        n = aot.get_slice(args.topology).devices
        meshes = [aot._resolved(aot.parse_mesh(args.mesh, n, args.batch_size), n)]
    result = plan.plan(args.model, args.topology, args.batch_size, args.seq_len, remats, meshes=meshes,
                       extra_gin=args.gin_bindings, log=lambda line: print(line, file=sys.stderr, flush=True),
                       rows=args.rows)
    print(plan.candidates_table(result))
    if args.json:
        aot.write_json(args.json, result)
    if result["best"] is None:
        print(f"{prog}: nothing fits {args.model} on {args.topology}; no plan written", file=sys.stderr)
        return 1
    plan.write_plan_gin(args.out, result)
    print(f"plan: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
