"""End to end as a user runs it: a real Prefect server, the gpu-pool work pool, `prefect deploy --all`,
a process worker, and `prefect deployment run svd-analysis/default --watch` on the tiny demo model.

Everything started here is stopped here, by PID (each in its own process group), with bounded waits.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lora_ranks.config import load_rank_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, name: str) -> None:
    """SIGTERM the process group we created; a Prefect worker may need a second one; SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        raise RuntimeError(f"{name} (pid {proc.pid}) did not stop")


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_readme_starts_the_server_on_loopback():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    starts = [line for page in pages for line in page.read_text().splitlines() if "prefect server start" in line]
    assert starts and all("--host 127.0.0.1" in line for line in starts)


def _run(args, env, timeout):
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _deployed(api: str) -> dict[str, list]:
    """{"flow/deployment": [[cron, active] per schedule]} of every deployment on the server at ``api``, read from its
    REST API in this process (a Python process that imports Prefect's client costs ~5 CPU-seconds)."""
    def post(path: str) -> list:
        request = urllib.request.Request(f"{api}/{path}", data=b"{}", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    flows = {f["id"]: f["name"] for f in post("flows/filter")}
    return {f"{flows[d['flow_id']]}/{d['name']}": [[s["schedule"].get("cron"), s["active"]] for s in d["schedules"]]
            for d in post("deployments/filter")}


def test_deployment_run_through_server_and_worker(tmp_path, migrated_prefect_database):
    port = _free_port()
    (tmp_path / "prefect-home").mkdir()  # a home with a migrated database: the server starts ~7 CPU-seconds sooner
    shutil.copyfile(migrated_prefect_database, tmp_path / "prefect-home" / "prefect.db")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_UI_ENABLED": "false"}
    started: list[tuple[subprocess.Popen, str]] = []
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", "worker")}
    try:
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                                  env=env, stdout=logs["server"], stderr=subprocess.STDOUT, start_new_session=True)
        started.append((server, "server"))
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not become healthy within 120 s"
            time.sleep(0.5)

        assert _listening_addresses(port) == {"127.0.0.1"}  # loopback only, not 0.0.0.0

        _run([PREFECT, "work-pool", "create", "gpu-pool", "--type", "process", "--base-job-template",
              "deployments/gpu-pool.base-job-template.json"], env, 120)
        _run([PREFECT, "deploy", "--all", "--no-prompt"], env, 180)
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "gpu-pool"], cwd=REPO, env=env,
                                  stdout=logs["worker"], stderr=subprocess.STDOUT, start_new_session=True)
        started.append((worker, "worker"))
        out_dir = tmp_path / "run"
        watched = _run([PREFECT, "deployment", "run", "svd-analysis/default", "--watch", "--watch-timeout", "400",
                        "--param", f"output_dir={out_dir}", "--param", 'finetune={"max_steps": 2}'], env, 450)
        assert "Completed" in watched  # --watch also exits non-zero when the run fails

        # Every deployment of prefect.yaml, read from the server (a `prefect deployment inspect` each took ~8 s of
        # CPU to start).
        deployed = _deployed(env["PREFECT_API_URL"])
        for name in ("svd-analysis/default", "preliminary-finetune/default", "train-dynamic-lora/default",
                     "compare-allocations/default", "export-adapter/default", "check-config/default"):
            assert name in deployed, sorted(deployed)
        assert deployed["svd-analysis/nightly-reanalysis"] == [["0 3 * * *", False]]

        config = load_rank_config(out_dir / "configs" / "lora_rank_config.json")
        assert all(4 <= r <= 128 for r in config.rank_pattern.values())
        assert config.analysis_metadata.n_modules == 28
    finally:
        for proc, name in reversed(started):
            _stop(proc, name)
        for handle in logs.values():
            handle.close()
