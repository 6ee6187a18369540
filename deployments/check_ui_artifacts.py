"""Show that the analysis artifacts render in the Prefect UI: screenshots taken by headless Chromium.

Starts a Prefect server (UI on, 127.0.0.1, a free port, a temporary PREFECT_HOME), runs the demo flow
against it, then screenshots the flow-run page and each artifact page. Stops what it started, by PID.

    apt-get install -y chromium            # Debian's package; once
    .venv/bin/python deployments/check_ui_artifacts.py --out ui-check/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=20000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, body: dict | None = None):
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def screenshot(chromium: str, url: str, target: Path, size: str = "1400,2200") -> None:
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--screenshot={target}", url], check=True, capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ui-check", help="folder for the screenshots")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    home = tempfile.mkdtemp(prefix="prefect-home-")
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_API_URL": f"{base}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _api(f"{base}/api/health") is True:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("Prefect server did not start")
            time.sleep(0.5)
        subprocess.run([str(Path(sys.executable).with_name("lora-ranks")), "demo", "--out", str(out / "run")],
                       env=env, check=True, cwd=REPO, timeout=600, capture_output=True)
        run = _api(f"{base}/api/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})[0]
        artifacts = _api(f"{base}/api/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        shots = {"flow-run.png": f"{base}/runs/flow-run/{run['id']}?tab=Artifacts"}
        for artifact in artifacts:
            shots[f"artifact-{artifact['key']}.png"] = f"{base}/artifacts/artifact/{artifact['id']}"
        for name, url in shots.items():
            screenshot(chromium, url, out / name)
            print(f"{out / name}  <- {url}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
