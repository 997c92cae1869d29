"""A real deployment on 127.0.0.1 through the scripts in deploy/: a SuperLink with TLS and
SuperNode authentication, SuperNodes that present registered keys, trust the test's CA and
read their own data folders, and `flwr run` submitting to them.

Free ports, a private FLWR_HOME, and every process stopped at the end (also on failure).
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
NODES = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    def __init__(self, root: Path, tiny_model_dir: str) -> None:
        self.root, self.model = root, tiny_model_dir
        self.port = free_port()
        self.env = dict(os.environ, FLWR_HOME=str(root / "flwr-home"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        self.nodes: list[str] = []

    def sh(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(a) for a in args], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args[0]} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc

    def start_node(self, name: str, partition: int, key: Path, ca: Path | None = None, check: bool = True,
                   epsilon: float = 6.0, *extra) -> subprocess.CompletedProcess:
        self.nodes.append(name)
        return self.sh(DEPLOY / "supernode.sh", "start", self.root, name, "--superlink", f"127.0.0.1:{self.port}",
                       "--ca", ca or self.root / "certs" / "ca.crt", "--key", key,
                       "--partition", partition, "--partitions", NODES,
                       "--data-path", self.root / "data" / f"node-{partition}",
                       "--ledger", self.root / "ledgers" / f"node-{partition}.json", "--epsilon", epsilon, *extra,
                       check=check)

    def stop(self) -> None:
        for name in self.nodes:
            self.sh(DEPLOY / "supernode.sh", "stop", self.root, name, check=False)
        self.sh(DEPLOY / "superlink.sh", "stop", self.root, check=False)
        # Whatever Flower started and the scripts could not reach: nothing may outlive the test.
        for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
            try:
                if str(self.root) in " ".join(proc.info["cmdline"] or []) or \
                        (proc.info["environ"] or {}).get("FLWR_HOME") == self.env["FLWR_HOME"]:
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("deploy")
    d = Deployment(root, tiny_model_dir)
    try:
        d.sh(DEPLOY / "certs.sh", root / "certs")
        d.sh(DEPLOY / "superlink.sh", "start", root, "--certs", root / "certs", "--port", d.port)
        d.sh(DEPLOY / "connection.sh", "loopback", f"127.0.0.1:{d.port}", "--ca", root / "certs" / "ca.crt")
        (root / "ledgers").mkdir()
        server_test_split(root / "server-data")
        for i in range(NODES):
            d.sh(DEPLOY / "node-key.sh", root / "keys", f"node-{i}")
            d.sh(BIN / "flwr", "supernode", "register", root / "keys" / f"node-{i}.pub", "loopback")
            d.sh(BIN / "fedortho", "export-partition", "--partition-id", i, "--num-partitions", NODES,
                 "--to", root / "data" / f"node-{i}", "--max-train-examples", 240)
        yield d
    finally:
        d.stop()


def server_test_split(folder: Path) -> None:
    """The server's data: the embedded dataset's test split alone (it never sees the clients')."""
    import datasets

    from fedortho import data
    from fedortho.config import RunConfig

    splits = data.splits_for(RunConfig(max_test_examples=64))
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(splits.label_names))})
    test = datasets.Dataset.from_dict({"text": list(splits.test_texts), "label": splits.test_labels.tolist()},
                                      features=features)
    datasets.DatasetDict({"test": test}).save_to_disk(str(folder))


def run_settings(d: Deployment, out: Path, **extra) -> str:
    settings = {"model": f'"{d.model}"', "dataset": f'"{d.root / "server-data"}"', "clients": NODES, "clients-per-round": NODES, "rounds": 3,
                "local-steps": 2, "batch-size": 16, "max-train-examples": 240, "max-test-examples": 64,
                "epsilon": 6.0, "out": f'"{out}"', **extra}
    return " ".join(f"{k}={v}" for k, v in settings.items())


def command_line(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_an_unregistered_key_and_a_node_without_the_ca_are_refused(deployment):
    d = deployment
    d.sh(DEPLOY / "node-key.sh", d.root / "keys", "stranger")  # made, never registered
    d.sh(DEPLOY / "certs.sh", d.root / "other-ca")  # a CA the SuperLink's certificate is not from
    d.start_node("stranger", 0, d.root / "keys" / "stranger", check=False)
    d.start_node("untrusting", 1, d.root / "keys" / "node-1", ca=d.root / "other-ca" / "ca.crt", check=False)
    wait_for(lambda: "Failed to activate SuperNode" in d.log("stranger"), 60,
             "the SuperLink to refuse the unregistered key")
    assert re.search(r'"POST /v1/fleet/activate-node HTTP/1.1" 412', d.log("superlink"))
    wait_for(lambda: re.search(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|SSL", d.log("untrusting")), 60,
             "the node without the CA to refuse the SuperLink's certificate")
    listed = d.sh(BIN / "flwr", "supernode", "list", "loopback", "--format", "json").stdout
    assert "SuperNode ID" not in d.log("stranger") and "SuperNode ID" not in d.log("untrusting")
    for name in ("stranger", "untrusting"):
        d.sh(DEPLOY / "supernode.sh", "stop", d.root, name)
    assert listed  # the registered keys are listed; the stranger's is not among them
    assert (d.root / "keys" / "stranger.pub").read_text().split()[1] not in listed


def test_a_serverapp_config_error_reaches_the_user_as_one_line(deployment, tmp_path):
    d = deployment
    proc = d.sh(BIN / "flwr", "run", REPO, "loopback", "--stream", "--run-config",
                run_settings(d, tmp_path / "run", rounds=0), check=False, timeout=180)
    output = proc.stdout + proc.stderr
    assert "fedortho: ERROR: rounds must be >= 1, got 0" in output, output[-3000:]
    run_id = re.search(r"run (\d+)", output, re.I) or re.search(r"(\d{10,})", output)
    listing = d.sh(BIN / "flwr", "ls", "loopback", "--format", "json").stdout
    assert "rounds must be >= 1, got 0" in listing and "failed" in listing.lower(), listing[-2000:]
    assert run_id is not None


def test_private_fedsvd_survives_a_supernode_restart(deployment):
    d = deployment
    keys = d.root / "keys"
    for i in range(NODES):
        d.start_node(f"node-{i}", i, keys / f"node-{i}")
    # A third node, pinned to another epsilon: dropped at discovery with its own reason.
    d.sh(DEPLOY / "node-key.sh", keys, "pinned")
    d.sh(BIN / "flwr", "supernode", "register", keys / "pinned.pub", "loopback")
    d.start_node("pinned", 1, keys / "pinned", None, True, 3.0, "--no-worker")
    out = d.root / "run"
    flwr = subprocess.Popen([str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream", "--run-config",
                             run_settings(d, out)], cwd=d.root, env=d.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        metrics = out / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 240, "round 1")
        # Partition 0's SuperNode crashes after round 1 (SIGKILL: no goodbye to the SuperLink, its
        # Flower state lost) and is started again at once. The SuperLink keeps the crashed
        # session open until its heartbeats are missed; the restarted node retries until then.
        keeper = psutil.Process(int((d.root / "node-0.pid").read_text()))  # supernode.sh's restart loop
        supernode = [p for p in keeper.children(recursive=True) if "flower-supernode" in " ".join(command_line(p))]
        assert len(supernode) == 1
        supernode[0].kill()
        _, alive = psutil.wait_procs([keeper], timeout=10)  # a crash is not retried: the loop ends too
        assert not alive
        d.start_node("node-0", 0, keys / "node-0")
        output, _ = flwr.communicate(timeout=480)
    finally:
        if flwr.poll() is None:
            flwr.kill()
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3], output[-3000:]
    assert summary["completed"] is True and summary["empty-rounds"] == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["app-hash"] and config["flower-run-id"]

    # The failure is charged to partition 0, never to partition 1.
    failed = [r["round"] for r in rows if r.get("clients-failed")]
    assert failed and all(r["clients-replied"] >= 1 for r in rows[1:])
    assert "client 0 failed" in output and "client 1 failed" not in output, output[-3000:]
    assert re.search(r"client node \d+ cannot take part: the server asks for epsilon=6.0 but this node is pinned "
                     r"to epsilon=3", output), output[-3000:]

    # Each node's ledger holds the DP steps it trained (at each noise multiplier and sample
    # rate): every round the server saw, and at most one more (a node killed after writing its
    # ledger but before its reply left spent budget the server never saw).
    privacy = [json.loads(line) for line in (out / "privacy.jsonl").read_text().splitlines()]
    for i in range(NODES):
        ledger = json.loads((d.root / "ledgers" / f"node-{i}.json").read_text())
        seen = [r for r in privacy if r["partition"] == i and not r.get("budget-exhausted")]
        in_ledger, by_server = {}, {}
        for sigma, rate, steps in ledger["history"]:
            in_ledger[(sigma, rate)] = in_ledger.get((sigma, rate), 0) + steps
        for r in seen:
            key = (r["noise-multiplier"], r["sample-rate"])
            by_server[key] = by_server.get(key, 0) + r["steps"]
        assert in_ledger.keys() == by_server.keys()
        assert all(by_server[k] <= in_ledger[k] <= by_server[k] + 2 for k in by_server)  # 2 local steps
        assert seen[-1]["epsilon"] - 1e-9 <= ledger["epsilon-spent"] <= 6.0 + 1e-9
        if i == 1:  # never interrupted: exactly what the server saw
            assert in_ledger == by_server and ledger["epsilon-spent"] == pytest.approx(seen[-1]["epsilon"], abs=1e-9)
    assert len([r for r in privacy if r["partition"] == 1]) == 3

    # `--run-config 'resume="<run folder>"'` reaches the ServerApp (the SuperLink refuses keys
    # its app config lacks), which checks the checkpoint: this run has nothing left to do.
    proc = d.sh(BIN / "flwr", "run", REPO, "loopback", "--stream", "--run-config",
                run_settings(d, out, resume=f'"{out}"'), check=False, timeout=180)
    output = proc.stdout + proc.stderr
    assert "fedortho: ERROR: the run has already finished all 3 rounds" in output, output[-3000:]
    assert [json.loads(line)["round"] for line in metrics.read_text().splitlines()] == [0, 1, 2, 3]  # untouched


def test_the_app_bundle_holds_code_only():
    """What `flwr run` ships to every node: the packages' Python files and pyproject.toml;
    no results, benchmarks, tests or documents."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist()
    code = [n for n in names if n not in ("pyproject.toml", ".info/CONTENT")]
    assert {"client/app.py", "server/app.py", "fedortho/privacy.py", "fedortho/node.py"} <= set(code)
    assert all(n.endswith(".py") and n.split("/")[0] in ("fedortho", "server", "client") for n in code), code
