"""`python -m moetx.cli.check_checkpoint MODEL_DIR` (`moetx-check-checkpoint`): report the state
of every checkpoint of a model directory (intact, unverified, damaged and why, moved aside).

Exit status 0 when the newest checkpoint is intact or unverified, 1 when it is damaged, 2 on a
bad argument. `--size-only` skips the CRC-32 of every file (fast on large checkpoints).
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moetx-check-checkpoint", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--size-only", action="store_true",
                        help="compare file sizes with the manifest, not checksums")
    args = parser.parse_args(argv)
    from moetx.trainer import checkpoints  # after parsing: --help without JAX

    try:
        rows = checkpoints.check_all(args.model_dir, checksums=not args.size_only)
    except FileNotFoundError as e:
        print(f"moetx: error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"{args.model_dir}: no checkpoints")
        return 0
    for name, state in rows:
        print(f"{name}: {state}")
    live = [state for name, state in rows if state != "moved aside"]
    return 1 if live and live[0].startswith("damaged") else 0


if __name__ == "__main__":
    sys.exit(main())
