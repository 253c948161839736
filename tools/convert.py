"""Thin wrapper: `python tools/convert.py ...` is `lima-convert ...` without installing the package."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lima_jax.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
