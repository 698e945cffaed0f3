"""The `unimrg` command line.

    unimrg ingest  [-m MANIFEST]                 images -> images/shard-NNNNN.parquet
    unimrg run     [-m MANIFEST] [--only S ...] [--force S ...]   the whole DAG (Prefect)
    unimrg status  [-m MANIFEST] [--json]        per stage: shards done, stale, missing
    unimrg preview [-m MANIFEST] --out F.png     contact sheet of image, depth, segmentation
    unimrg train   [-m MANIFEST] [--max-steps N] [--resume]

A bad manifest or bad argument prints one line naming the field and exits with code 2.
Subcommands import their machinery lazily so `unimrg --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.manifest import ManifestError, load_manifest

DEFAULT_MANIFEST = "data_manifest.yaml"


def _add_manifest(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m", "--manifest", default=DEFAULT_MANIFEST,
        help=f"path to the manifest (default: {DEFAULT_MANIFEST})",
    )


def _cmd_ingest(args: argparse.Namespace) -> int:
    from pipeline.ingest import ingest

    result = ingest(load_manifest(args.manifest), progress=not args.quiet)
    return 0 if result is not None else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unimrg",
        description="Turn a pile of images into UniMRG post-training data (image shards, depth "
        "and segmentation pseudo-labels as Parquet) and run the post-training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "ingest",
        help="read every source into append-only image shards",
        description="Read every source in the manifest (folders, globs, path lists, Parquet) and "
        "write new unique images to <output_dir>/images/shard-NNNNN.parquet. Exact duplicates "
        "are stored once; unusable files go to <output_dir>/quarantine/ with a reason. "
        "Existing shards are never rewritten.",
    )
    _add_manifest(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ingest)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ManifestError as exc:
        print(f"unimrg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unimrg: interrupted; completed shards are kept, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
