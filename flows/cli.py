"""The `unimrg` command line.

    unimrg ingest  [-m MANIFEST]                 images -> images/shard-NNNNN.parquet
    unimrg run     [-m MANIFEST] [--only S ...] [--force S ...]   the whole DAG (Prefect)
    unimrg status  [-m MANIFEST] [--json]        per stage: shards done, stale, missing
    unimrg preview [-m MANIFEST] --out F.png     contact sheet of image, depth, segmentation
    unimrg train   [-m MANIFEST] [--max-steps N] [--resume]
    unimrg eval    [-m MANIFEST] [--model base|latest|PATH] [--only NAME ...]   benchmark table
    unimrg score   --benchmark F.tsv --predictions P.jsonl --kind KIND        metrics as JSON
    unimrg deploy  [-m MANIFEST] [--gpus N]      gpu work pool, GPU limit, prefect.yaml deployments
    unimrg clean   [-m MANIFEST] [--dry-run] [--keep-current]   remove unused fingerprints' outputs
    unimrg export  [-m MANIFEST] --to DIR        images + depth + segmentation targets, push_to_hub layout
    unimrg export  --checkpoint PATH --to DIR    a training checkpoint as a hub-ready model folder

A bad manifest or bad argument (an `output_dir` that is a file or cannot be written included),
or an input file it names that cannot be read (a source list or understanding data that is not
UTF-8, not JSON or nested too deeply: pipeline/input_files.py), prints one line naming the file
and field or line and exits with code 2; every other expected failure (no image shards yet, a
full disk, a concurrent run on the same folder, a corrupt checkpoint) prints one line naming the
path and exits with code 1. `unimrg --debug ...` (or
UNIMRG_DEBUG=1) shows the traceback.
Subcommands import their machinery lazily so `unimrg --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile

from pipeline.locks import Busy
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
    from trainer.checkpoints import export_checkpoint

    to = export_checkpoint(args.checkpoint, args.to)
    print(f"wrote {to} (hub-ready model folder: `hf upload <repo> {to}`)")
    return 0


def _cmd_deploy(args: argparse.Namespace, manifest: Manifest) -> int:
    from flows.deploy import deploy

    return deploy(gpus=args.gpus, prefect_file=args.prefect_file, manifest_path=args.manifest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unimrg",
        description="Turn a pile of images into UniMRG post-training data (image shards, depth "
        "and segmentation pseudo-labels as Parquet) and run the post-training.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an expected failure (also: UNIMRG_DEBUG=1)",
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

    stages = ["ingest", *STAGE_NAMES, "train", "eval"]
    p = sub.add_parser(
        "run",
        help="run the whole DAG with Prefect (ingest, depth, segment, train, eval)",
        description="Run ingest, then depth and segment per image shard, then train, then eval "
        "(one task per model and benchmark), as Prefect "
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
        "on-demand training), which run the manifest given with -m. The manifest is checked first. "
        "See docs/deploy.md.",
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
        description="Remove labels/<stage>/<fp>/, train/<fp>/ and eval/<fp>/ folders of "
        "fingerprints the manifest no longer uses (older settings or models; `unimrg status` "
        "lists them with what made them) and temporary files left by interrupted writes, then "
        "say what that freed. Image shards, quarantine and the current outputs stay. Only "
        "folders whose lineage.json says unimrg made them go, and only inside output_dir; "
        "refused while a `unimrg run`, an ingest or any training on this output_dir is running.",
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

    from flows.eval_commands import add_commands

    add_commands(sub, _add_manifest)
    return parser


#: Commands that write under output_dir: it is checked before they start.
_WRITES = {"ingest", "run", "train", "eval"}


def check_output_dir(manifest: Manifest) -> None:
    """Raise ManifestError naming `output_dir` when it is a file or cannot be written.

    Found before any work starts, rather than as a traceback from the first write.
    """
    out = manifest.out
    where = f"output_dir: {out}"
    for parent in [out, *out.parents]:
        if parent.exists():
            break
    if not parent.is_dir():
        raise ManifestError(f"{where}: {parent} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".unimrg-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ManifestError(f"{where}: cannot write there ({exc.strerror or exc})") from None


def _one_line(exc: BaseException) -> str:
    """An expected failure as one line that names the path where there is one."""
    if isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc):
        return f"a checkpoint is damaged ({str(exc).split('. ')[0]})"
    if isinstance(exc, OSError):
        path = exc.filename or ""
        if exc.errno == errno.ENOSPC or "No space left" in str(exc):
            return (
                f"{path or 'a write'}: the disk is full (No space left on device); free space "
                "and rerun: everything already completed is kept"
            ).lstrip(": ")
        if path and exc.strerror:
            return f"{path}: {exc.strerror}"
    return str(exc).replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get("UNIMRG_DEBUG"))
    try:
        # Every command checks the manifest first, before any heavy import or GPU work
        # (scoring predictions and exporting a checkpoint need none).
        exporting_checkpoint = getattr(args, "checkpoint", None) is not None
        needs = getattr(args, "needs_manifest", True) and not exporting_checkpoint
        manifest = load_manifest(args.manifest) if needs else None
        if manifest is not None and args.command in _WRITES:
            check_output_dir(manifest)
        return args.func(args, manifest)
    except ManifestError as exc:
        if debug:
            raise
        print(f"unimrg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unimrg: interrupted; completed shards are kept, rerun to continue", file=sys.stderr)
        return 130
    except Exception as exc:
        # Bad input or a bad environment found after the manifest (no shards yet, a bad data
        # file, a full disk, a concurrent run, a corrupt checkpoint): one line naming the file
        # or field. Anything else is a bug and keeps its traceback. --debug (or
        # UNIMRG_DEBUG=1) shows the traceback of the expected ones too.
        if debug or not _expected(exc):
            raise
        print(f"unimrg: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _expected(exc: BaseException) -> bool:
    """An error that means bad input or environment, not a bug: ValueError, OSError, a held
    lock, a damaged Parquet file, a damaged checkpoint (the pickle, zip or safetensors errors of
    torch.load and safetensors), a file cut short."""
    import pickle
    import zipfile

    import pyarrow as pa

    kinds = (ValueError, OSError, Busy, pa.ArrowException, pickle.UnpicklingError)
    if isinstance(exc, (*kinds, zipfile.BadZipFile, EOFError)):
        return True
    if type(exc).__name__ == "SafetensorError":
        return True
    # torch.load of a truncated checkpoint: RuntimeError("PytorchStreamReader failed ...")
    return isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc)


if __name__ == "__main__":
    sys.exit(main())
