"""`unimrg deploy`: make a Prefect server ready to run unimrg on GPU workers, in one command.

    PREFECT_API_URL=http://<server>:4200/api unimrg deploy [-m MANIFEST] [--gpus N]

It does, idempotently (run it again after editing prefect.yaml):
  1. creates the work pools that prefect.yaml names (`gpu`), as `process` pools, when missing;
  2. sets the tag concurrency limit `gpu` to N: at most N tasks tagged `gpu` (the label and
     train tasks, flows.tasks.GPU_TAG) run at once over all workers, one per GPU;
  3. runs `prefect --no-prompt deploy --all` on prefect.yaml: the nightly label deployment and
     the on-demand training deployment, with their `manifest_path` parameter set to the
     manifest given with `-m` (relative to prefect.yaml's folder when it lies inside it).
Then start a worker on each GPU machine: `prefect worker start --pool gpu`. See docs/deploy.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from flows.tasks import GPU_TAG

__all__ = ["deploy"]

DEFAULT_PREFECT_FILE = Path(__file__).resolve().parents[1] / "prefect.yaml"


def _prefect_command() -> list[str]:
    script = Path(sys.executable).parent / "prefect"
    return [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]


def work_pools(prefect_file: str | Path) -> list[str]:
    """The work pools that the deployments of a prefect.yaml use."""
    config = yaml.safe_load(Path(prefect_file).read_text()) or {}
    return sorted(
        {
            d["work_pool"]["name"]
            for d in config.get("deployments") or []
            if (d.get("work_pool") or {}).get("name")
        }
    )


def with_manifest(prefect_file: Path, manifest_path: str | Path) -> tuple[Path, str]:
    """A copy of `prefect_file` (beside it, a dotted name) whose deployments take this manifest.

    Returns (the copy, the `manifest_path` written). `prefect deploy --all` applies no
    `--param` overrides, so the parameter is changed in the file it reads.
    """
    manifest = Path(manifest_path).resolve()
    try:
        value = str(manifest.relative_to(prefect_file.parent))
    except ValueError:
        value = str(manifest)
    config = yaml.safe_load(prefect_file.read_text()) or {}
    for d in config.get("deployments") or []:
        params = d.get("parameters")
        if isinstance(params, dict) and "manifest_path" in params:
            params["manifest_path"] = value
    copy = prefect_file.with_name(f".{prefect_file.stem}.unimrg-{os.getpid()}.yaml")
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy, value


def deploy(
    gpus: int = 1,
    prefect_file: str | Path = DEFAULT_PREFECT_FILE,
    manifest_path: str | Path | None = None,
) -> int:
    """Work pool, GPU concurrency limit, deployments; returns `prefect deploy`'s exit code.

    `manifest_path`: the manifest the deployments run (default: the one prefect.yaml names).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        print(
            "unimrg deploy: PREFECT_API_URL is not set: deployments need a Prefect server "
            "that keeps them (e.g. http://127.0.0.1:4200/api)",
            file=sys.stderr,
        )
        return 2
    if gpus < 1:
        print(f"unimrg deploy: --gpus: expected a positive integer, got {gpus}", file=sys.stderr)
        return 2
    prefect_file = Path(prefect_file).resolve()
    if not prefect_file.is_file():
        print(f"unimrg deploy: {prefect_file}: no such file", file=sys.stderr)
        return 2
    from flows.dag import unreachable_api

    unreachable = unreachable_api()
    if unreachable:
        print(f"unimrg deploy: {unreachable}", file=sys.stderr)
        return 1

    pools = work_pools(prefect_file)
    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                found = client.read_work_pool(pool)
                print(f"work pool {pool!r} exists (type {found.type})")
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                print(f"work pool {pool!r} created (type process)")
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=gpus)  # an upsert
        print(f"concurrency limit: at most {gpus} task(s) tagged {GPU_TAG!r} at once")

    # `prefect deploy` itself, so prefect.yaml means exactly what Prefect's docs say it means.
    target, copy = prefect_file, None
    if manifest_path is not None:
        copy, value = with_manifest(prefect_file, manifest_path)
        target = copy
        print(f"deployments run the manifest {value}")
    try:
        proc = subprocess.run(
            [
                *_prefect_command(),
                "--no-prompt",
                "deploy",
                "--all",
                "--prefect-file",
                str(target),
            ],
            cwd=prefect_file.parent,
            env={**os.environ, "PREFECT_API_URL": api},
        )
    finally:
        if copy is not None:
            copy.unlink(missing_ok=True)
    if proc.returncode == 0:
        print(
            "deployments registered; on each GPU machine start a worker: "
            + "; ".join(f"prefect worker start --pool {p}" for p in pools)
        )
    return proc.returncode
