"""`walt-export` (also `python export.py`): command-line entry point.

    walt-export summary [--preset tiny] [--checkpoint PATH] [--meta]   build a cascade and print its parts
    walt-export init --preset NAME --out PATH.safetensors [--seed N]   write a seeded random-init checkpoint
"""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_PRESET = "tiny"


def _parser() -> argparse.ArgumentParser:
    from walt_export.config import PRESETS

    parser = argparse.ArgumentParser(prog="walt-export", description="Build, export and compile W.A.L.T cascades.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)

    summary = sub.add_parser("summary", help="build a cascade (preset or checkpoint) and print its parts")
    source = summary.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(PRESETS), default=None, help=f"default: {DEFAULT_PRESET}")
    source.add_argument("--checkpoint", help="a .safetensors cascade checkpoint (its .json beside it)")
    summary.add_argument("--meta", action="store_true", help="build on the meta device (no memory; paper presets)")
    summary.add_argument("--seed", type=int, default=0)

    init = sub.add_parser("init", help="write a checkpoint of a preset with seeded random weights")
    init.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET)
    init.add_argument("--out", required=True, help="path ending in .safetensors; the config goes beside it as .json")
    init.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import walt_export

    try:
        if args.command == "summary":
            if args.checkpoint:
                cascade = walt_export.load(args.checkpoint)
                if not isinstance(cascade, walt_export.Cascade):
                    raise walt_export.CheckpointError(f"{args.checkpoint} holds one part, not a cascade")
            else:
                cascade = walt_export.build(args.preset or DEFAULT_PRESET, seed=args.seed,
                                            device="meta" if args.meta else "cpu")
            print(cascade.summary())
        elif args.command == "init":
            cascade = walt_export.build(args.preset, seed=args.seed)
            path = walt_export.save(cascade, args.out)
            print(f"wrote {path} and {path.with_suffix('.json').name} ({args.preset}, seed {args.seed})")
    except (walt_export.CheckpointError, walt_export.ConfigError) as e:
        print(f"walt-export: error: {e}", file=sys.stderr)
        return 1
    return 0
