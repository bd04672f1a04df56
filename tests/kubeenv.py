"""A real kube-apiserver + etcd pair (the pinned builds in bin/) for the integration and e2e tiers.

Started once per test session on free loopback ports in a temporary directory, with static token
authentication and RBAC; torn down at the end. Nothing here is faked: it is the same API server a
cluster runs, without the controllers and kubelet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

TOKEN = "csi-thin-test-admin-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class KubeEnv:
    server: str
    token: str
    ca_file: str
    workdir: pathlib.Path
    #: kill the API server and start it again on the same port and etcd (watches break, data stays)
    restart_apiserver: Callable[[], None] = dataclasses.field(default=lambda: None, compare=False)

    def kubeconfig_dict(self) -> dict[str, object]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "test", "cluster": {"server": self.server, "certificate-authority": self.ca_file}}
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        }

    def api_client(self, *, impersonate: str = "", extra: dict[str, str] | None = None) -> Any:
        """A `kubernetes` ApiClient for this server (as admin, or impersonating a user with extra
        user info, e.g. the node name a node-bound service-account token carries)."""
        import kubernetes

        cfg = kubernetes.client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = self.ca_file
        cfg.api_key = {"authorization": f"Bearer {self.token}"}
        api = kubernetes.client.ApiClient(cfg)
        if impersonate:
            api.set_default_header("Impersonate-User", impersonate)
            for key, value in (extra or {}).items():
                api.set_default_header(f"Impersonate-Extra-{urllib.parse.quote(key, safe='')}", value)
        return api

    def write_kubeconfig(self, path: pathlib.Path) -> pathlib.Path:
        path.write_text(json.dumps(self.kubeconfig_dict()))
        return path

    def get(self, path: str) -> tuple[int, bytes]:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return int(resp.status), bytes(resp.read())


def _wait_ready(env: KubeEnv, proc: subprocess.Popen[bytes], log: pathlib.Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, ssl.SSLError):
            try:
                status, body = env.get("/readyz")
                if status == 200:
                    return
                last = body.decode()
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace")
        time.sleep(0.25)
    raise RuntimeError(f"kube-apiserver not ready in {timeout}s: {last[-2000:]}\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running(bin_dir: pathlib.Path, *, timeout: float = 120.0) -> Iterator[KubeEnv]:
    with tempfile.TemporaryDirectory(prefix="csi-thin-kube-") as tmp:
        work = pathlib.Path(tmp)
        etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd_log = work / "etcd.log"
        api_log = work / "apiserver.log"
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with etcd_log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            str(bin_dir / "etcd"),
                            "--data-dir",
                            str(work / "etcd"),
                            "--listen-client-urls",
                            etcd_url,
                            "--advertise-client-urls",
                            etcd_url,
                            "--listen-peer-urls",
                            f"http://127.0.0.1:{peer_port}",
                            "--initial-advertise-peer-urls",
                            f"http://127.0.0.1:{peer_port}",
                            "--initial-cluster",
                            f"default=http://127.0.0.1:{peer_port}",
                            "--unsafe-no-fsync",
                            "--log-level",
                            "warn",
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            subprocess.run(
                ["openssl", "genrsa", "-out", str(work / "sa.key"), "2048"],
                check=True,
                capture_output=True,
            )
            (work / "tokens.csv").write_text(f'{TOKEN},admin,admin-uid,"system:masters"\n')
            certs = work / "certs"
            api_argv = [
                str(bin_dir / "kube-apiserver"),
                "--etcd-servers",
                etcd_url,
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--secure-port",
                str(api_port),
                "--cert-dir",
                str(certs),
                "--token-auth-file",
                str(work / "tokens.csv"),
                "--authorization-mode",
                "RBAC",
                "--service-account-issuer",
                "https://csi-thin.test",
                "--service-account-key-file",
                str(work / "sa.key"),
                "--service-account-signing-key-file",
                str(work / "sa.key"),
                "--service-cluster-ip-range",
                "10.96.0.0/24",
                "--disable-admission-plugins",
                "ServiceAccount",
                "--enable-priority-and-fairness=false",
                # as clusters run it (kubeadm's default): a CSI node plugin is a privileged pod, and
                # without this the API server refuses its DaemonSet
                "--allow-privileged=true",
            ]

            def start_apiserver() -> subprocess.Popen[bytes]:
                with api_log.open("ab") as out:
                    return subprocess.Popen(
                        api_argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "GOMAXPROCS": "2"}
                    )

            procs.append(start_apiserver())
            ca = certs / "apiserver.crt"
            end = time.monotonic() + timeout
            while not ca.exists() and time.monotonic() < end:
                time.sleep(0.1)

            def restart() -> None:
                # killed, as a crashed or evicted API server: a graceful stop drains open watches
                # for up to a minute, which only slows the test down
                old = procs.pop()
                old.kill()
                old.wait(timeout=60)
                procs.append(start_apiserver())
                _wait_ready(env, procs[-1], api_log, timeout)

            env = KubeEnv(
                server=f"https://127.0.0.1:{api_port}",
                token=TOKEN,
                ca_file=str(ca),
                workdir=work,
                restart_apiserver=restart,
            )
            _wait_ready(env, procs[-1], api_log, max(1.0, end - time.monotonic()))
            yield env
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in reversed(procs):
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
