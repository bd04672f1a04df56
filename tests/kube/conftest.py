"""The kube tier: a real kube-apiserver + etcd with the chart's CRDs, and csi-thin's real processes
(a controller and node agents, each on its own reflink pool of loop devices, as root) driven over
their CSI sockets exactly as the sidecars drive them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import kubernetes
import pytest

from csi_thin import demo
from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from tests import conftest, kubecrds, kubeenv

G, V = "csi-thin.io", "v1alpha1"
TOPOLOGY_KEY = "csi-thin.io/node"
MiB = 1024 * 1024
GiB = 1024 * MiB


@pytest.fixture(scope="session")
def kube() -> Iterator[kubeenv.KubeEnv]:
    conftest.tool("kube-apiserver")
    conftest.tool("etcd")
    with kubeenv.running(conftest.BIN) as env:
        kubecrds.install(env)
        yield env


@dataclasses.dataclass
class Proc:
    """One csi-thin process: its argv, socket, log, and the Popen while it runs."""

    argv: list[str]
    socket: pathlib.Path
    log: pathlib.Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def start(self, *, kill_at: str = "", wait: bool = True) -> None:
        env = {**self.env, "CSI_THIN_TEST_KILL_AT": kill_at} if kill_at else self.env
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        assert self.popen is not None
        end = time.monotonic() + timeout
        with grpc.insecure_channel(f"unix://{self.socket}") as ch:
            stub = csi_pb2_grpc.IdentityStub(ch)
            while time.monotonic() < end:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"{self.argv[3]} exited {self.popen.returncode}:\n{self.tail()}")
                with contextlib.suppress(grpc.RpcError):
                    if stub.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value:
                        return
                time.sleep(0.1)  # process start-up: nothing to watch until its socket answers
        raise RuntimeError(f"{self.argv[3]} not ready in {timeout}s:\n{self.tail()}")

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=30)

    def wait_dead(self, timeout: float = 60.0) -> int:
        """Wait for a process that is to kill itself (a fault seam); its exit code."""
        assert self.popen is not None
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@dataclasses.dataclass
class Node:
    name: str
    workdir: pathlib.Path
    config: pathlib.Path
    proc: Proc

    def csi(self) -> demo.Demo:
        return demo.Demo(grpc.insecure_channel(f"unix://{self.proc.socket}"))


@dataclasses.dataclass
class Cluster:
    env: kubeenv.KubeEnv
    tag: str
    controller_proc: Proc
    nodes: dict[str, Node]
    channels: list[grpc.Channel]

    @property
    def api(self) -> Any:
        return kubernetes.client.CustomObjectsApi(self.env.api_client())

    def controller(self) -> csi_pb2_grpc.ControllerStub:
        ch = grpc.insecure_channel(f"unix://{self.controller_proc.socket}")
        self.channels.append(ch)
        return csi_pb2_grpc.ControllerStub(ch)

    def node(self, key: str) -> demo.Demo:
        d = self.nodes[key].csi()
        return d

    def cr(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.api.get_cluster_custom_object(G, V, plural, name))
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def crs(self, plural: str, node: str) -> list[dict[str, Any]]:
        got = self.api.list_cluster_custom_object(G, V, plural, field_selector=f"spec.nodeName={node}")
        return list(got["items"])

    def pool(self, key: str) -> dict[str, Any]:
        node = self.nodes[key].name
        (tp,) = self.crs("thinpools", node)
        return dict(tp)

    def devices(self, key: str) -> list[str]:
        """The device records of a node's pool, read by `csi-thin pool list` next to the agent."""
        argv = [
            sys.executable,
            "-m",
            "csi_thin.cli",
            "pool",
            "list",
            "--json",
            "--config",
            str(self.nodes[key].config),
        ]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        import json

        return sorted(d["name"] for d in json.loads(out))


def _pool_yaml(workdir: pathlib.Path, size: str) -> pathlib.Path:
    path = workdir / "pool.yaml"
    path.write_text(
        "name: p\nbackend: reflink\n"
        f"state_dir: {workdir}/state\n"
        "reflink:\n"
        f"  directory: {workdir}/pool\n  image_file: {workdir}/pool.img\n  image_size: {size}\n"
        "  fs_type: xfs\n"
    )
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.kube.agent_main", *args]


@pytest.fixture
def cluster(kube: kubeenv.KubeEnv, tmp_path: pathlib.Path) -> Iterator[Cluster]:
    """Two node agents (pools of 1 GiB and 2 GiB, node names unique to the test) and a controller."""
    with make_cluster(kube, tmp_path) as c:
        yield c


@contextlib.contextmanager
def make_cluster(
    kube: kubeenv.KubeEnv,
    tmp_path: pathlib.Path,
    *,
    node_args: Callable[[str], list[str]] | None = None,
    controller_args: Sequence[str] = (),
) -> Iterator[Cluster]:
    """The `cluster` fixture's cluster, with more arguments for node `key`'s and the controller's
    command lines (tests/kube/test_snapshot_metadata_kube.py: the snapshot metadata link's TLS)."""
    tag = uuid.uuid4().hex[:6]
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    root = pathlib.Path(__file__).resolve().parent.parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    nodes: dict[str, Node] = {}
    kubelet_root = pathlib.Path(tempfile.mkdtemp(prefix="kubelet-", dir="/tmp"))
    for key, size in (("a", "1GiB"), ("b", "2GiB")):
        work = tmp_path / key
        work.mkdir()
        cfg = _pool_yaml(work, size)
        name = f"n{key}-{tag}"
        sock = work / "csi.sock"
        argv = _cli(
            "node",
            "--endpoint",
            f"unix://{sock}",
            "--node-id",
            name,
            "--pool-config",
            str(cfg),
            "--kubeconfig",
            str(kubeconfig),
            "--log-level",
            "INFO",
            # kubelet's plugin registry (a short path: a unix socket path holds 107 bytes), and
            # /healthz + /metrics on a port the kernel picks
            "--kubelet-dir",
            str(kubelet_root / key),
            "--http-endpoint",
            "127.0.0.1:0",
            *(node_args(key) if node_args else ()),
        )
        nodes[key] = Node(name=name, workdir=work, config=cfg, proc=Proc(argv, sock, work / "node.log", env))
    csock = tmp_path / "controller.sock"
    cproc = Proc(
        _cli(
            "controller",
            "--endpoint",
            f"unix://{csock}",
            "--kubeconfig",
            str(kubeconfig),
            "--log-level",
            "INFO",
            "--http-endpoint",
            "127.0.0.1:0",
            *controller_args,
        ),
        csock,
        tmp_path / "controller.log",
        env,
    )
    c = Cluster(env=kube, tag=tag, controller_proc=cproc, nodes=nodes, channels=[])
    try:
        for n in nodes.values():
            n.proc.start(wait=False)
        cproc.start()
        for n in nodes.values():
            n.proc.wait_ready()
        for key in nodes:  # each node process registered itself with "kubelet"
            assert (kubelet_root / key / "plugins_registry" / "csi-thin.io-reg.sock").is_socket()
        yield c
    finally:
        shutil.rmtree(kubelet_root, ignore_errors=True)
        for ch in c.channels:
            ch.close()
        cproc.stop()
        for n in nodes.values():
            n.proc.stop()
        problems: list[str] = []
        for n in nodes.values():
            try:
                _forget(c, n.name)
            except Exception as exc:  # the API server may be what failed: the pools go anyway
                problems.append(f"forgetting the CRs of {n.name}: {exc!r}")
            problems += demo.cleanup(n.workdir, n.config)
        for n in [*nodes.values()]:
            if n.proc.popen is not None and n.proc.popen.returncode not in (
                0,
                -signal.SIGTERM,
                -signal.SIGKILL,
            ):
                problems.append(f"node {n.name} exited {n.proc.popen.returncode}:\n{n.proc.tail()}")
        assert not problems, problems


def _forget(c: Cluster, node: str) -> None:
    """Remove this test's CRs from the shared API server (their devices go with the pool)."""
    api = c.api
    for plural in ("thingroupsnapshots", "thinvolumes", "thinsnapshots", "thinpools"):
        for item in c.crs(plural, node):
            name = item["metadata"]["name"]
            with contextlib.suppress(kubernetes.client.exceptions.ApiException):
                api.patch_cluster_custom_object(G, V, plural, name, {"metadata": {"finalizers": None}})
            with contextlib.suppress(kubernetes.client.exceptions.ApiException):
                api.delete_cluster_custom_object(G, V, plural, name)
