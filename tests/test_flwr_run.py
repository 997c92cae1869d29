"""The same app through `flwr run .` with a managed local SuperLink (simulation connection).

Private FLWR_HOME and ports, no runtime dependency installation; every process the
SuperLink starts (SuperExec, simulation, Ray) is stopped afterwards.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_superlink(port: int) -> None:
    """Stop the SuperLink listening on ``port`` and its whole process tree and groups."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(c.endswith("flower-superlink") for c in cmd) and str(port) in cmd:
            tree = [proc] + proc.children(recursive=True)
            groups = set()
            for p in tree:
                try:
                    groups.add(os.getpgid(p.pid))
                except ProcessLookupError:
                    pass
            for p in tree:
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            for g in groups - {os.getpgid(0)}:
                try:
                    os.killpg(g, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            _, alive = psutil.wait_procs(tree, timeout=10)
            for p in alive:
                p.kill()
            time.sleep(1)
            for g in groups - {os.getpgid(0)}:
                try:
                    os.killpg(g, signal.SIGKILL)  # orphaned Ray agents stay in the group
                except ProcessLookupError:
                    pass


def test_flwr_run_local_simulation(tmp_path, tiny_model_dir):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    port = free_port()
    out = tmp_path / "run"
    overrides = tmp_path / "overrides.toml"
    overrides.write_text(
        f'model = "{tiny_model_dir}"\nclients = 3\nclients-per-round = 2\nrounds = 2\nlocal-steps = 2\n'
        f'batch-size = 16\nmax-train-examples = 240\nmax-test-examples = 64\nepsilon = 6.0\n'
        f'out = "{out}"\n')
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    flwr = str(Path(sys.executable).parent / "flwr")
    try:
        # A neutral working directory: Ray puts the SuperLink's cwd first on the clients' path.
        proc = subprocess.run([flwr, "run", str(REPO), "local", "--stream",
                               "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
                               "--run-config", str(overrides)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_superlink(port)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert (out / "summary.json").is_file(), log[-3000:]  # `flwr run` exits 0 even if the app failed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients-replied"] == 2 and 0 < r["epsilon"] <= 6.0 for r in rows[1:])
    assert (out / "adapter" / "adapter_config.json").is_file()
