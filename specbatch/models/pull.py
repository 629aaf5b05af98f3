"""``python -m specbatch.models.pull NAME``: fetch and convert a registered model; print its directory last."""

from __future__ import annotations

import argparse
import sys

from specbatch.models.registry import REGISTRY, pull_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specbatch.models.pull", description=__doc__)
    parser.add_argument("name", help=f"registered model name: {', '.join(sorted(REGISTRY))}")
    args = parser.parse_args(argv)
    try:
        directory = pull_model(args.name)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
