"""The browser check: run the DAG against a real Prefect server and screenshot its UI.

    .venv/bin/python scripts/ui_screenshot.py [-m data_manifest.yaml] [--out docs/ui]

What it does, in order:
  1. starts `prefect server start --host 127.0.0.1 --port 4200` in the background, with
     PREFECT_HOME in a fresh temporary folder (so it touches none of your Prefect state), and
     waits for http://127.0.0.1:4200/api/health;
  2. runs `unimrg run -m MANIFEST` with PREFECT_API_URL=http://127.0.0.1:4200/api;
  3. finds the newest top-level flow run (and its artifacts) through the REST API;
  4. opens, in headless Chromium, the flow-run page (graph and logs), its Task Runs and Artifacts
     tabs, the artifacts list and the first table and markdown artifacts, and saves a PNG of
     each in --out:
     flow-run.png, flow-run-task-runs.png, flow-run-artifacts.png, artifacts.png, and
     artifact-table.png / artifact-markdown.png for the first artifact of each kind, the last
     loss-curve and probe artifacts of training (artifact-train-loss.png,
     artifact-train-probe.png) and the train task run with its step lines
     (task-run-train.png) (each PNG is made smaller with Pillow when over 500 KB);
  5. runs the same command again and saves the second run's Task Runs tab, where every stage
     task is `Cached`, as flow-run-rerun-cached.png (skip with --no-rerun);
  6. stops the server and deletes the temporary folder.

What it needs: this project's virtual environment (.venv, `make setup`) and Chromium. It installs
nothing, with one exception: when no Chromium is found and the script runs as root on Debian or
Ubuntu, it runs `apt-get install -y chromium` (pass --no-install to refuse; then install it
yourself or give --chromium PATH). Chromium runs with a throw-away profile, no sandbox (for
root in containers) and its background networking off, so it talks only to 127.0.0.1.

Exit code: 0 when the DAG runs succeeded and every screenshot was written; 1 otherwise (the
screenshots of a failed run are still taken: they show what failed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_PNG_BYTES = 500_000


def _venv_bin(name: str) -> str:
    """A console script of the interpreter running this file (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def find_chromium(explicit: str | None, install: bool) -> str:
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("ui_screenshot: Chromium not found; running `apt-get install -y chromium`")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
        if path := shutil.which("chromium"):
            return path
    sys.exit("ui_screenshot: Chromium not found: `apt-get install chromium`, or --chromium PATH")


def _get_json(url: str, body: dict | None = None, timeout: float = 10) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(
                f"ui_screenshot: prefect server exited ({server.returncode}); see {log}:\n"
                + log.read_text()[-3000:]
            )
        try:
            if _get_json(f"{api}/health", timeout=2) is True:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(1)
    sys.exit(f"ui_screenshot: {api}/health not healthy after {timeout_s:.0f}s; see {log}")


def newest_flow_run(api: str) -> dict:
    runs = _get_json(
        f"{api}/flow_runs/filter",
        {
            "flow_runs": {"parent_task_run_id": {"is_null_": True}},
            "sort": "EXPECTED_START_TIME_DESC",
            "limit": 1,
        },
    )
    if not runs:
        sys.exit("ui_screenshot: the server has no flow run: did the DAG run at all?")
    return runs[0]


def run_artifacts(api: str, flow_run_id: str) -> list[dict]:
    """Artifacts of the flow run and of all its subflow runs, oldest first."""
    ids, frontier = [flow_run_id], [flow_run_id]
    while frontier:
        children = _get_json(
            f"{api}/flow_runs/filter",
            {
                "flow_runs": {"parent_flow_run_id": {"operator": "or_", "any_": frontier}},
                "limit": 200,
            },
        )
        frontier = [c["id"] for c in children]
        ids += frontier
    newest_first = _get_json(
        f"{api}/artifacts/filter",
        {
            "artifacts": {"flow_run_id": {"any_": ids}},
            "sort": "CREATED_DESC",
            "limit": 200,
        },
    )
    return newest_first[::-1]


def train_task_run(api: str, flow_run_id: str) -> str | None:
    """The id of the flow run's train task run, if it has one."""
    runs = _get_json(
        f"{api}/task_runs/filter",
        {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200},
    )
    return next((r["id"] for r in runs if r["name"].startswith("train ")), None)


def _chromium_flags(profile: Path, size: str) -> list[str]:
    """Headless, throw-away profile, no background networking: it talks only to 127.0.0.1."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={size}",
    ]


def screenshot(chromium: str, url: str, out: Path, profile: Path, size: str) -> bool:
    cmd = [
        chromium,
        *_chromium_flags(profile, size),
        "--virtual-time-budget=15000",
        f"--screenshot={out}",
        url,
    ]
    out.unlink(missing_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.exists():
        print(
            f"ui_screenshot: Chromium failed on {url} ({proc.returncode}):\n{proc.stderr[-2000:]}"
        )
        return False
    shrink(out)
    print(f"ui_screenshot: {url} -> {out} ({out.stat().st_size // 1024} KB)")
    return True


class _DevTools:
    """The few Chrome DevTools Protocol calls needed to click a tab before the screenshot.

    The flow-run page ignores `?tab=Artifacts` (it resets the tab while the run loads), so the
    tab pages are taken by clicking the tab in a headless Chromium driven over its debugging
    port (loopback only). `websockets` comes with Prefect.
    """

    def __init__(self, chromium: str, profile: Path, size: str) -> None:
        self.proc = subprocess.Popen(
            [
                chromium,
                *_chromium_flags(profile, size),
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not open its debugging port")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        pages = [t for t in _get_json(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page"]
        from websockets.sync.client import connect

        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        self.next_id = 0
        width, height = (int(v) for v in size.split(","))
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, js: str) -> object:
        return self.call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get(
            "value"
        )

    def wait_for(self, js: str, timeout_s: float = 30) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.evaluate(js):
                return True
            time.sleep(0.25)
        return False

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def screenshot_tab(
    chromium: str, url: str, tab: str, out: Path, profile: Path, size: str, settle_s: float = 3.0
) -> bool:
    """Open `url`, click the tab labelled `tab`, wait for the page to settle, save a PNG."""
    import base64

    find = (
        "[...document.querySelectorAll('button, a, [role=tab], li, span')]"
        f".find(e => e.textContent.trim() === {json.dumps(tab)} && e.offsetParent !== null)"
    )
    try:
        devtools = _DevTools(chromium, profile, size)
    except (RuntimeError, OSError, urllib.error.URLError) as exc:
        print(f"ui_screenshot: Chromium (debugging port) failed: {exc}")
        return False
    try:
        devtools.call("Page.enable")
        devtools.call("Page.navigate", url=url)
        if not devtools.wait_for(f"!!({find})"):
            print(f"ui_screenshot: no tab {tab!r} on {url}")
            return False
        time.sleep(settle_s)  # let the run's data load before switching tabs
        devtools.evaluate(f"({find}).click()")
        time.sleep(settle_s)
        png = devtools.call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(png))
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"ui_screenshot: Chromium failed on {url} [{tab}]: {exc}")
        return False
    finally:
        devtools.close()
    shrink(out)
    print(f"ui_screenshot: {url} [{tab}] -> {out} ({out.stat().st_size // 1024} KB)")
    return True


def shrink(png: Path) -> None:
    """Keep screenshots committable: a 256-colour palette when the PNG is over the limit."""
    if png.stat().st_size <= MAX_PNG_BYTES:
        return
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--manifest", default="data_manifest.yaml", help="manifest to run")
    p.add_argument("--out", default="docs/ui", help="folder for the PNGs (default docs/ui)")
    p.add_argument("--port", type=int, default=4200, help="server port on 127.0.0.1")
    p.add_argument("--chromium", help="Chromium executable (default: found on PATH)")
    p.add_argument("--no-install", action="store_true", help="never apt-get install Chromium")
    p.add_argument("--window-size", default="1600,1200", help="browser window, W,H in pixels")
    p.add_argument(
        "--no-rerun",
        action="store_true",
        help="skip the second, all-cached run (and flow-run-rerun-cached.png)",
    )
    p.add_argument(
        "--run-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `unimrg run` (repeatable), e.g. --run-arg=--force",
    )
    args = p.parse_args(argv)

    chromium = find_chromium(args.chromium, install=not args.no_install)
    out_dir = (ROOT / args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{args.port}/api"
    ui = f"http://127.0.0.1:{args.port}"

    with tempfile.TemporaryDirectory(prefix="unimrg-ui-") as tmp_s:
        tmp = Path(tmp_s)
        env = {
            **os.environ,
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": api,
        }
        env.pop("PREFECT_API_URL", None)
        log = tmp / "server.log"
        with log.open("w") as log_f:
            server = subprocess.Popen(
                [
                    _venv_bin("prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(args.port),
                ],
                stdout=log_f,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
        try:
            wait_healthy(api, server, log)
            print(f"ui_screenshot: Prefect server healthy at {ui}")
            run_env = {**env, "PREFECT_API_URL": api}
            run = subprocess.run(
                [_venv_bin("unimrg"), "run", "-m", args.manifest, *args.run_arg],
                env=run_env,
                cwd=ROOT,
            )
            print(f"ui_screenshot: `unimrg run` exited {run.returncode}")

            flow_run = newest_flow_run(api)
            fr = flow_run["id"]
            print(f"ui_screenshot: flow run {flow_run['name']} ({fr}): {flow_run['state_type']}")
            pages = [
                (f"{ui}/runs/flow-run/{fr}", "flow-run.png"),
                (f"{ui}/artifacts", "artifacts.png"),
            ]
            artifacts = run_artifacts(api, fr)
            print(
                f"ui_screenshot: {len(artifacts)} artifacts: "
                + ", ".join(sorted({f"{a['type']}:{a.get('key')}" for a in artifacts}))
            )
            for kind in ("table", "markdown"):
                first = next((a for a in artifacts if a["type"] == kind), None)
                if first is not None:
                    pages.append((f"{ui}/artifacts/artifact/{first['id']}", f"artifact-{kind}.png"))
            # Training as it was published: the last loss curves and probe grid, and the train
            # task run's page (its step log lines).
            for key, name in (
                ("unimrg-train-loss", "artifact-train-loss.png"),
                ("unimrg-train-probe", "artifact-train-probe.png"),
            ):
                last = next((a for a in reversed(artifacts) if a.get("key") == key), None)
                if last is not None:
                    pages.append((f"{ui}/artifacts/artifact/{last['id']}", name))
            shots = [
                screenshot(chromium, url, out_dir / name, tmp / f"profile-{i}", args.window_size)
                for i, (url, name) in enumerate(pages)
            ]
            tabs = [
                (f"{ui}/runs/flow-run/{fr}", "Task Runs", "flow-run-task-runs.png"),
                (f"{ui}/runs/flow-run/{fr}", "Artifacts", "flow-run-artifacts.png"),
            ]
            train_run = train_task_run(api, fr)
            if train_run is not None:  # its logs load only once the tab is shown
                tabs.append((f"{ui}/runs/task-run/{train_run}", "Logs", "task-run-train.png"))
            runs_ok = [run.returncode == 0 and flow_run["state_type"] == "COMPLETED"]
            if not args.no_rerun:
                # The same command again: nothing changed, so every stage task shows `Cached`.
                rerun = subprocess.run(
                    [_venv_bin("unimrg"), "run", "-m", args.manifest],
                    env=run_env,
                    cwd=ROOT,
                )
                second = newest_flow_run(api)
                print(
                    f"ui_screenshot: rerun exited {rerun.returncode}, flow run "
                    f"{second['id']}: {second['state_type']}"
                )
                runs_ok.append(rerun.returncode == 0 and second["state_type"] == "COMPLETED")
                tabs.append(
                    (f"{ui}/runs/flow-run/{second['id']}", "Task Runs", "flow-run-rerun-cached.png")
                )
            for url, tab, name in tabs:
                shots.append(
                    screenshot_tab(
                        chromium,
                        url,
                        tab,
                        out_dir / name,
                        tmp / f"profile-{name}",
                        args.window_size,
                    )
                )
            ok = all(shots) and all(runs_ok)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
