"""The `unimrg` command line.

    unimrg ingest  [-m MANIFEST]                 images -> images/shard-NNNNN.parquet
    unimrg run     [-m MANIFEST] [--only S ...] [--force S ...]   the whole DAG (Prefect)
    unimrg status  [-m MANIFEST] [--json]        per stage: shards done, stale, missing
    unimrg preview [-m MANIFEST] --out F.png     contact sheet of image, depth, segmentation
    unimrg train   [-m MANIFEST] [--max-steps N] [--resume]
    unimrg deploy  [--gpus N]                    gpu work pool, GPU limit, prefect.yaml deployments
    unimrg clean   [-m MANIFEST] [--dry-run] [--keep-current]   remove unused fingerprints' outputs
    unimrg export  [-m MANIFEST] --to DIR        images + depth + segmentation targets, push_to_hub layout
    unimrg export  --checkpoint PATH --to DIR    a training checkpoint as a hub-ready model folder

A bad manifest or bad argument prints one line naming the field and exits with code 2; other bad
input (no image shards yet, a malformed data file) prints one line and exits with code 1
(UNIMRG_DEBUG=1 shows the traceback).
Subcommands import their machinery lazily so `unimrg --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.manifest import Manifest, ManifestError, load_manifest

DEFAULT_MANIFEST = "data_manifest.yaml"


def _add_manifest(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--manifest",
        default=DEFAULT_MANIFEST,
        help=f"path to the manifest (default: {DEFAULT_MANIFEST})",
    )


def _cmd_ingest(args: argparse.Namespace, manifest: Manifest) -> int:
    from pipeline.ingest import ingest

    ingest(manifest, progress=not args.quiet)
    return 0


def _cmd_run(args: argparse.Namespace, manifest: Manifest) -> int:
    from flows.dag import run_dag

    return run_dag(args.manifest, only=args.only, force=args.force, dask_address=args.dask_address)


def _cmd_status(args: argparse.Namespace, manifest: Manifest) -> int:
    from flows.status import print_status

    return print_status(manifest, as_json=args.json)


def _cmd_preview(args: argparse.Namespace, manifest: Manifest) -> int:
    from pipeline.preview import make_preview

    path = make_preview(manifest, args.out, n=args.n)
    print(f"wrote {path}")
    return 0


def _cmd_train(args: argparse.Namespace, manifest: Manifest) -> int:
    from trainer.loop import train

    result = train(manifest, max_steps=args.max_steps, resume=args.resume)
    state = "trained" if result.computed else "already trained (cached), nothing to do"
    print(f"train: {state}: {result.steps} steps -> {result.output_dir}")
    return 0


def _cmd_clean(args: argparse.Namespace, manifest: Manifest) -> int:
    from flows.clean import clean

    clean(manifest, dry_run=args.dry_run, keep_current=args.keep_current)
    return 0


def _cmd_export(args: argparse.Namespace, manifest: Manifest | None) -> int:
    if args.checkpoint is None:
        from pipeline.dataset import export_dataset

        to = export_dataset(manifest, args.to, complete=args.complete)
        print(f"wrote {to} (datasets layout: `load_dataset('{to}')`, `hf upload <repo> {to}`)")
        return 0
    from trainer.loop import export_checkpoint

    to = export_checkpoint(args.checkpoint, args.to)
    print(f"wrote {to} (hub-ready model folder: `hf upload <repo> {to}`)")
    return 0


def _cmd_deploy(args: argparse.Namespace, manifest: Manifest) -> int:
    from flows.deploy import deploy

    return deploy(gpus=args.gpus, prefect_file=args.prefect_file)


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

    from pipeline.stage import STAGE_NAMES

    stages = ["ingest", *STAGE_NAMES, "train"]
    p = sub.add_parser(
        "run",
        help="run the whole DAG with Prefect (ingest, depth, segment, train)",
        description="Run ingest, then depth and segment per image shard, then train, as Prefect "
        "flows. Uses PREFECT_API_URL when set, otherwise a temporary local Prefect server. "
        "Every (stage, shard) is cached by (stage fingerprint, input shard hash): an unchanged "
        "rerun recomputes nothing.",
    )
    _add_manifest(p)
    p.add_argument(
        "--only",
        nargs="+",
        choices=stages,
        metavar="STAGE",
        help=f"run only these stages ({', '.join(stages)})",
    )
    p.add_argument(
        "--force",
        nargs="+",
        choices=stages,
        default=[],
        metavar="STAGE",
        help="recompute these stages even when cached",
    )
    p.add_argument(
        "--dask-address",
        metavar="ADDR",
        help="run per-shard tasks on this Dask scheduler (tcp://host:8786)",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "status",
        help="per stage: shards done, stale or missing",
        description="Per stage, how many image shards have labels under the current "
        "fingerprint (done), only under other fingerprints (stale), or none (missing).",
    )
    _add_manifest(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "preview",
        help="write a contact sheet: image, depth, segmentation side by side",
        description="Write a PNG contact sheet of the first N images with their depth and "
        "segmentation targets. Labelled 'random weights' when labels came from tiny-random.",
    )
    _add_manifest(p)
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("-n", type=int, default=8, help="number of images (default 8)")
    p.set_defaults(func=_cmd_preview)

    p = sub.add_parser(
        "train",
        help="UniMRG post-training on the labelled shards",
        description="Train the manifest's model on four tasks (understanding, reconstruction, "
        "depth, segmentation) from the image and label shards. Checkpoints go to "
        "<output_dir>/<trainer.output_subdir>/<fingerprint>/step_NNNNNN.",
    )
    _add_manifest(p)
    p.add_argument("--max-steps", type=int, help="override trainer.max_steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "deploy",
        help="set up a Prefect server: gpu work pool, GPU concurrency limit, deployments",
        description="Against PREFECT_API_URL: create the work pools prefect.yaml names (`gpu`, "
        "process type), set the tag concurrency limit `gpu` to --gpus (GPU tasks running at "
        "once over all workers), and run `prefect deploy --all` (nightly labels at 02:00 UTC, "
        "on-demand training). The manifest is checked first. See docs/deploy.md.",
    )
    _add_manifest(p)
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="GPUs serving the pool: GPU tasks allowed at once (default 1)",
    )
    p.add_argument(
        "--prefect-file",
        default="prefect.yaml",
        help="deployment definitions (default: prefect.yaml)",
    )
    p.set_defaults(func=_cmd_deploy)

    p = sub.add_parser(
        "clean",
        help="remove the outputs of fingerprints the manifest no longer uses",
        description="Remove labels/<stage>/<fp>/ and train/<fp>/ folders of fingerprints the "
        "manifest no longer uses (older settings or models; `unimrg status` lists them with "
        "what made them) and temporary files left by interrupted writes, then say what that "
        "freed. Image shards, quarantine and the current outputs stay.",
    )
    _add_manifest(p)
    p.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    p.add_argument(
        "--keep-current",
        action="store_true",
        help="also trim the current training run to its newest checkpoint plus the final one",
    )
    p.set_defaults(func=_cmd_clean)

    p = sub.add_parser(
        "export",
        help="write the labelled data, or a training checkpoint, in a hub-ready folder",
        description="Without --checkpoint: the images joined with their depth and "
        "segmentation targets (the manifest's current fingerprints) as DIR/data/train-*.parquet "
        "with a README.md dataset card, the layout `push_to_hub` writes (`load_dataset(DIR)` "
        "reads it, images decoded). With --checkpoint: the model of a checkpoint "
        "(<output_dir>/train/<fp>/step_NNNNNN): weights, config, tokenizer, processor and chat "
        "template plus a README.md model card, no trainer state; transformers' "
        "AutoModel/AutoProcessor/AutoTokenizer open it.",
    )
    _add_manifest(p)
    p.add_argument("--checkpoint", metavar="PATH", help="a step_NNNNNN folder to export")
    p.add_argument("--to", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument(
        "--complete", action="store_true", help="data: leave out rows whose label has an error"
    )
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Every command checks the manifest first, before any heavy import or GPU work
        # (exporting a checkpoint needs none).
        exporting_checkpoint = getattr(args, "checkpoint", None) is not None
        manifest = None if exporting_checkpoint else load_manifest(args.manifest)
        return args.func(args, manifest)
    except ManifestError as exc:
        print(f"unimrg: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # Bad input found after the manifest (no shards yet, bad data file, ...): the message
        # names the file or field. UNIMRG_DEBUG=1 shows the traceback.
        if os.environ.get("UNIMRG_DEBUG"):
            raise
        print(f"unimrg: error: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("unimrg: interrupted; completed shards are kept, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
