"""Regenerates tests/golden/llama_65b_v4_256_specs.json: the PartitionSpec of every llama_65b parameter
on the default v4-256 mesh. Run it after an intended change to the sharding rules and review the diff.

    python tools/golden_sharding.py [--check]
"""
import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "golden",
                      "llama_65b_v4_256_specs.json")


def main() -> int:
    from lima_jax import aot

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args()
    current = aot.golden_specs()
    text = json.dumps(current, indent=1, sort_keys=True) + "\n"
    if args.check:
        same = open(GOLDEN).read() == text
        print("golden sharding: " + ("unchanged" if same else "CHANGED"))
        return 0 if same else 1
    from lima_jax.atomic import atomic_write_text

    atomic_write_text(GOLDEN, text)
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
