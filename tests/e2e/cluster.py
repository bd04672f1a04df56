"""A real single-node Kubernetes cluster on this host, for the e2e tier: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kubelet (the pinned builds in bin/), containerd and runc
from Debian, and the snapshot-controller with the VolumeSnapshot and VolumeGroupSnapshot CRDs.

Adapted from the measured kit in ../shared/kube-reference (its RECIPE.md explains each setting).
What this host and the network rule impose:
- Every listener is on 127.0.0.1 (free ports) or a unix socket under the state dir; the CNI config
  is loopback only, and containerd 1.6 cannot start a pod in a loopback-only netns, so every pod
  uses host networking.
- kubelet refuses a loopback --node-ip, but takes a --hostname-override that parses as an IP as the
  node's InternalIP: the node is named 127.0.0.1.
- The apiserver keeps no `kubernetes` Service endpoints (Endpoints may not hold loopback IPs), so
  in-cluster clients are pointed at 127.0.0.1 explicitly; the Service range is a loopback range so a
  client that still dials the Service IP stays on lo.
- cgroup v1 without systemd: `failCgroupV1: false`, cgroupfs; no CAP_SYS_RESOURCE, so containerd
  must not give the pause container a negative oom_score_adj (`restrict_oom_score_adj`).
- kubelet's iptables chains would outlive it in the host netns: `makeIPTablesUtilChains: false`.

Everything lives under one short temp dir; `stop()` undoes it all (pods first, so that kubelet runs
CSI unpublish/unstage while the node plugin still serves) and reports what it could not undo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tests.e2e import images

#: kubelet takes a hostname override that is an IP as the node's InternalIP (see the module doc)
NODE = "127.0.0.1"
#: virtual only (no kube-proxy): loopback, so even a client dialling the Service IP stays on lo
SERVICE_CIDR = "127.0.100.0/24"
SERVICE_IP = "127.0.100.1"
#: host-less names: containerd keeps them as given, and nothing resolves or pulls them
PAUSE_IMAGE = "localhost/csi-thin-e2e/pause:1"
BUSYBOX_IMAGE = "localhost/csi-thin-e2e/busybox:1"
TOKEN = "csi-thin-e2e-admin-token"

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], T | None], *, timeout: float, interval: float = 0.2) -> T:
    """Poll a condition until it holds (a truthy value) or the deadline passes, then fail naming it."""
    end = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except Exception as exc:  # the thing waited for may not exist yet
            last = exc
        if time.monotonic() >= end:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def _mounts_under(root: pathlib.Path) -> list[str]:
    prefix = f"{root}/"
    out = []
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(root) or point.startswith(prefix):
            out.append(point)
    return out


def loops_under(root: pathlib.Path) -> list[str]:
    """Loop devices of files under root, and of files on those loop devices (a reflink pool's
    volumes live on its image's filesystem), deepest first.

    Found by the backing file's device and inode, not its path: the kernel prints a backing file's
    path as its opener's mount namespace saw it, and once a pod's namespace is gone that is a path
    relative to a mount that no longer exists (`/pool/pool.img`)."""
    out = subprocess.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-INO,BACK-MAJ:MIN"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    loops = json.loads(out)["loopdevices"] if out.strip() else []
    top = root.stat().st_dev if root.exists() else -1
    files: set[tuple[tuple[int, int], int]] = set()
    for d, dirs, names in os.walk(root):
        # only root's own filesystem: never into mounts (pod volumes, the pool's filesystem)
        dirs[:] = [x for x in dirs if os.lstat(os.path.join(d, x)).st_dev == top]
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(d, name))
                files.add(((os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino))

    def backing(loop: dict[str, Any]) -> tuple[tuple[int, int], int]:
        if loop.get("back-ino") is None or not loop.get("back-maj:min"):
            return (-1, -1), -1  # a loop device without a backing file (being set up or torn down)
        major, minor = (int(x) for x in str(loop["back-maj:min"]).strip().split(":"))
        return (major, minor), int(loop["back-ino"])

    ours = [lo for lo in loops if backing(lo) in files]
    ours_rdev = {(os.major(r), os.minor(r)) for r in (os.stat(lo["name"]).st_rdev for lo in ours)}
    on_ours = [lo for lo in loops if lo not in ours and backing(lo)[0] in ours_rdev]
    return [lo["name"] for lo in on_ours + ours]


def _procs_naming(text: str) -> list[int]:
    """Live processes whose command line contains text (daemons, shims, containers' children)."""
    pids = []
    for d in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            if text in d.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                stat = d.joinpath("stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are gone, only not reaped yet
                    pids.append(int(d.name))
        except (OSError, ValueError):
            continue
    return [p for p in pids if p != os.getpid()]


def _kubepods() -> list[pathlib.Path]:
    """kubelet's top pod cgroup in each cgroup v1 hierarchy (cgroupfs driver, default cgroup root)."""
    return sorted(pathlib.Path("/sys/fs/cgroup").glob("*/kubepods"))


def _kubepods_pids() -> set[int]:
    pids: set[int] = set()
    for top in _kubepods():
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in procs.read_text().split())
    return pids


def _iptables() -> str:
    """The host's iptables and ip6tables rules, without counters and comments (compared at stop)."""
    out = []
    for cmd in ("iptables-save", "ip6tables-save"):
        text = subprocess.run([cmd], capture_output=True, text=True, check=False).stdout
        out += [ln for ln in text.splitlines() if not ln.startswith("#")]
        out = [ln.split(" [")[0] if ln.startswith(":") else ln for ln in out]
    return "\n".join(out)


@dataclasses.dataclass
class Cluster:
    root: pathlib.Path
    bin: pathlib.Path
    api_port: int = dataclasses.field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    _iptables_before: str | None = None
    #: paths outside the state dir that kubelet and containerd hard-code, and which we created
    _created_host_dirs: list[pathlib.Path] = dataclasses.field(default_factory=list)
    #: kubelet's cgroups (/sys/fs/cgroup/*/kubepods) are ours to empty and remove: none existed at start
    _owns_kubepods: bool = False

    # paths
    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.root / "kubeconfig"

    @property
    def kubelet_dir(self) -> pathlib.Path:
        return self.root / "kubelet"

    @property
    def ctr_sock(self) -> pathlib.Path:
        return self.root / "run" / "containerd.sock"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    # clients
    @property
    def client_env(self) -> dict[str, str]:
        """kubectl's and helm's environment: their API discovery cache under the state dir, not a
        new ~/.kube/cache/discovery/127.0.0.1_<port> left in $HOME by every run."""
        return {**os.environ, "KUBECACHEDIR": str(self.root / "kube-cache")}

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120) -> str:
        argv = [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        res = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.client_env,
            check=False,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def get(self, *args: str) -> Any:
        """`kubectl get ARGS -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", stdin=manifest)

    def helm(self, *args: str, timeout: float = 300) -> str:
        argv = [str(self.bin / "helm"), "--kubeconfig", str(self.kubeconfig), *args]
        env = {
            **self.client_env,
            "HELM_CACHE_HOME": str(self.root / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.root / "helm" / "config"),
            "HELM_DATA_HOME": str(self.root / "helm" / "data"),
        }
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def ctr(self, *args: str, check: bool = True) -> str:
        argv = ["ctr", "--address", str(self.ctr_sock), "--namespace", "k8s.io", *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def import_image(self, archive: pathlib.Path) -> None:
        self.ctr("images", "import", "--no-unpack", str(archive))

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def diagnose(self, namespaces: tuple[str, ...]) -> str:
        """What a user looks at when something is stuck: pods, claims, events, and the last lines of
        every container's log in the given namespaces."""
        out = [
            self.kubectl(
                "get", "pods,pvc,pv,volumesnapshots,volumegroupsnapshots", "-A", "-o", "wide", check=False
            )
        ]
        out.append(self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False)[-6000:])
        for ns in namespaces:
            for pod in self.get("pods", "-n", ns)["items"]:
                for container in pod["spec"]["containers"]:
                    name = f"{ns}/{pod['metadata']['name']}/{container['name']}"
                    log = self.kubectl("logs", "-n", ns, pod["metadata"]["name"], "-c", container["name"],
                                       "--tail=40", check=False)  # fmt: skip
                    out.append(f"--- {name}\n{log}")
        return "\n".join(out)

    # start
    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with (self.root / "logs" / f"{name}.log").open("ab") as out:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def _alive(self, name: str) -> bool:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.log(name)}")
        return True

    def _wait(self, what: str, check: Callable[[], object], timeout: float, *names: str) -> None:
        def step() -> object:
            for name in names:
                self._alive(name)
            return check()

        wait_for(what, step, timeout=timeout)
        self.timings[what] = time.monotonic() - self._t0

    def start(self) -> None:
        self._t0 = time.monotonic()
        # kubelet's pod cgroups are at a fixed place: another kubelet's there would be taken over (its
        # pods, unknown to ours, removed as orphans), and stop() would remove them
        if others := _kubepods():
            raise RuntimeError(
                f"kubelet's cgroups exist already ({', '.join(map(str, others))}): another kubelet runs "
                "on this host, or one left them; the e2e cluster's kubelet would take them over"
            )
        self._owns_kubepods = True
        self._iptables_before = _iptables()
        # kubelet's device-plugin socket dir, containerd 1.6's shim socket dir: hard-coded, so
        # removed at stop when this cluster made them
        for hard_coded in (pathlib.Path("/var/lib/kubelet"), pathlib.Path("/run/containerd")):
            if not hard_coded.exists():
                self._created_host_dirs.append(hard_coded)
        for d in ("logs", "pki", "etc/cni", "etcd", "containerd", "run", "kubelet", "pods-logs", "images"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._pki()
        self._configs()
        self._images()
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._start(
            "etcd",
            [
                str(self.bin / "etcd"),
                "--name",
                "e2e",
                "--data-dir",
                str(self.root / "etcd"),
                "--listen-client-urls",
                etcd_url,
                "--advertise-client-urls",
                etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"e2e=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )
        self._start("containerd", ["containerd", "--config", str(self.root / "etc" / "containerd.toml")])
        pki = self.root / "pki"
        self._start(
            "apiserver",
            [
                str(self.bin / "kube-apiserver"),
                "--etcd-servers",
                etcd_url,
                "--bind-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                "--advertise-address=127.0.0.1",
                # Endpoints may not hold loopback IPs: no "kubernetes" endpoint reconciling
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cert-dir={self.root / 'apiserver-certs'}",
                # logs and exec dial the node's InternalIP (127.0.0.1): its name resolves nowhere
                "--kubelet-preferred-address-types=InternalIP",
            ],
            env={"GOMAXPROCS": "2"},
        )
        self._wait("containerd socket", self.ctr_sock.is_socket, 60, "containerd")
        for archive in sorted((self.root / "images").glob("*.tar")):
            self.import_image(archive)
        self.timings["images imported"] = time.monotonic() - self._t0
        self._wait(
            "apiserver ready",
            lambda: self.kubectl("get", "--raw", "/readyz", check=False),
            120,
            "etcd",
            "apiserver",
        )
        common = [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
        ]
        self._start(
            "controller-manager",
            [
                str(self.bin / "kube-controller-manager"),
                *common,
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--allocate-node-cidrs=false",
                "--controllers=*",
            ],
        )
        self._start(
            "scheduler",
            [
                str(self.bin / "kube-scheduler"),
                *common,
                f"--secure-port={free_port()}",
                "--leader-elect=false",
            ],
        )
        self._start_kubelet()
        # the snapshot-controller runs beside the cluster's controllers, as a cluster add-on would
        for crd in sorted((self.bin / "crds" / "snapshot").glob("*.yaml")):
            self.kubectl("apply", "--server-side", "-f", str(crd))
        self.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/volumesnapshots.snapshot.storage.k8s.io",
            "crd/volumesnapshotcontents.snapshot.storage.k8s.io",
            "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
            "crd/volumegroupsnapshots.groupsnapshot.storage.k8s.io",
            "crd/volumegroupsnapshotcontents.groupsnapshot.storage.k8s.io",
            "crd/volumegroupsnapshotclasses.groupsnapshot.storage.k8s.io",
        )
        self._start(
            "snapshot-controller",
            [
                str(self.bin / "snapshot-controller"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-election=false",
                # its group controller: GA and on by default in v8.7.0, said as the chart says it
                # to csi-snapshotter; it runs only where the group CRDs above are served
                "--feature-gates=CSIVolumeGroupSnapshot=true",
            ],
        )
        self._wait(f"node {NODE} Ready", self._node_ready, 180, "kubelet", "apiserver")
        self._wait(
            "default service account",
            lambda: self.kubectl("get", "sa", "default", check=False),
            60,
            "controller-manager",
        )

    def _node_ready(self) -> bool:
        node = self.get("node", NODE)
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])

    def shared_dir(self, path: pathlib.Path) -> None:
        """Bidirectional mount propagation (the CSI node plugin's pod) needs a shared mount: the
        directory on an rshared bind mount of itself, rather than making the host's / shared."""
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        subprocess.run(["mount", "--make-rshared", str(path)], check=True)

    def _start_kubelet(self) -> None:
        kd = str(self.kubelet_dir)
        self.shared_dir(self.kubelet_dir)
        self._start(
            "kubelet",
            [
                str(self.bin / "kubelet"),
                f"--config={self.root / 'etc' / 'kubelet.yaml'}",
                f"--kubeconfig={self.kubeconfig}",
                f"--root-dir={kd}",
                f"--cert-dir={kd}/pki",
                f"--hostname-override={NODE}",
                "--v=1",
            ],
        )

    def _pki(self) -> None:
        pki = self.root / "pki"

        def ssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

        ssl("genrsa", "-out", "ca.key", "2048")
        ssl(
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=csi-thin-e2e-ca",
            "-days",
            "30",
            "-out",
            "ca.crt",
        )
        ssl("genrsa", "-out", "apiserver.key", "2048")
        (pki / "apiserver.ext").write_text(
            "subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
            f"DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:{SERVICE_IP}\nextendedKeyUsage=serverAuth\n"
        )
        ssl("req", "-new", "-key", "apiserver.key", "-subj", "/CN=kube-apiserver", "-out", "apiserver.csr")
        ssl(
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "apiserver.ext",
            "-out",
            "apiserver.crt",
        )
        ssl("genrsa", "-out", "sa.key", "2048")
        ssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        (pki / "tokens.csv").write_text(f"{TOKEN},admin,admin-uid,system:masters\n")

    def _configs(self) -> None:
        r, pki = self.root, self.root / "pki"
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "e2e",
                            "cluster": {"server": self.server, "certificate-authority": str(pki / "ca.crt")},
                        }
                    ],
                    "users": [{"name": "admin", "user": {"token": TOKEN}}],
                    "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "admin"}}],
                    "current-context": "e2e",
                }
            )
        )
        (r / "etc" / "cni" / "10-loopback.conflist").write_text(
            json.dumps({"cniVersion": "0.4.0", "name": "loopback-only", "plugins": [{"type": "loopback"}]})
        )
        (r / "etc" / "containerd.toml").write_text(f"""version = 2
root = "{r}/containerd"
state = "{r}/run/containerd"
[grpc]
  address = "{self.ctr_sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{r}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # exec/attach/port-forward streams on loopback only
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # no CAP_SYS_RESOURCE here: a negative oom_score_adj (-998 for pause) makes runc init fail
  restrict_oom_score_adj = true
  # pod netns bind mounts under the state dir instead of /run/netns
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        # runc's state under ours, not /run/containerd/runc
        Root = "{r}/run/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    # only the loopback plugin: the network is "ready", pods get nothing but lo
    conf_dir = "{r}/etc/cni"
""")
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "containerRuntimeEndpoint": f"unix://{self.ctr_sock}",
            "authentication": {
                "anonymous": {"enabled": True},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "address": "127.0.0.1",
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "clusterDomain": "cluster.local",
            "clusterDNS": [],
            "staticPodPath": "",
            "podLogsDir": str(r / "pods-logs"),
            "resolvConf": "/etc/resolv.conf",
            # a busy shared test host: never evict the test's pods for disk or memory pressure
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
        }
        (r / "etc" / "kubelet.yaml").write_text(json.dumps(kubelet))

    def _images(self) -> None:
        out = self.root / "images"
        images.binary_image(out / "pause.tar", ref=PAUSE_IMAGE, binary=self.bin / "pause")
        images.busybox_image(out / "busybox.tar", ref=BUSYBOX_IMAGE, busybox=pathlib.Path("/bin/busybox"))

    # stop
    def stop(self) -> list[str]:
        """Undo start(): pods first (kubelet unpublishes and unstages their volumes while the node
        plugin still runs), then the processes, containers, mounts, loop devices and cgroups. Returns
        what was left behind (empty when clean).

        Every step runs whatever the one before did: a step that fails or times out (a hung
        apiserver, containerd gone) or a Ctrl-C during the slow, gentle part must not leave kubelet,
        containerd and the mounts behind. A KeyboardInterrupt is raised again once all is undone."""
        problems: list[str] = []
        interrupted: KeyboardInterrupt | None = None

        def step(what: str, undo: Callable[[], object]) -> None:
            nonlocal interrupted
            try:
                undo()
            except KeyboardInterrupt as exc:
                interrupted = interrupted or exc
                problems.append(f"{what}: interrupted")
            except Exception as exc:
                problems.append(f"{what} failed: {exc!r}")

        if "apiserver" in self.procs and self.procs["apiserver"].poll() is None:
            step(
                "deleting the pods",
                lambda: self.kubectl(
                    "delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--wait=true",
                    "--timeout=90s", check=False, timeout=120,
                ),
            )  # fmt: skip
        step("stopping kubelet", lambda: self._stop("kubelet"))
        step("removing the containers", self._remove_containers)
        for name in (
            "snapshot-controller",
            "containerd",
            "scheduler",
            "controller-manager",
            "apiserver",
            "etcd",
        ):
            step(f"stopping {name}", functools.partial(self._stop, name))
        for what, undo in self._host_steps():
            step(what, undo)
        step("listing what is left", lambda: problems.extend(self._leftovers()))
        if interrupted is not None:
            raise interrupted
        return problems

    def _remove_containers(self) -> None:
        """The containers kubelet left: deleting their tasks makes the runc shims exit."""
        if not self.ctr_sock.is_socket():
            return
        for task in self.ctr("tasks", "ls", "-q", check=False).split():
            self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
        for task in self.ctr("tasks", "ls", "-q", check=False).split():
            self.ctr("tasks", "delete", "--force", task, check=False)
        for container in self.ctr("containers", "ls", "-q", check=False).split():
            self.ctr("containers", "delete", container, check=False)

    def _host_steps(self) -> list[tuple[str, Callable[[], object]]]:
        """Processes, mounts, loop devices and cgroups the cluster leaves on the host, in order."""
        return [
            ("killing what names the state dir", self._kill_procs),
            ("unmounting", self._unmount),
            ("detaching loop devices", self._detach_loops),
            ("removing cgroups and host dirs", self._release_host),
        ]

    def _kill_procs(self) -> None:
        # shims and any container process left name the state dir in their command line
        for pid in _procs_naming(f"{self.root}/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_for(
                "no process naming the state dir", lambda: not _procs_naming(f"{self.root}/"), timeout=10
            )

    def _unmount(self) -> None:
        for point in sorted(_mounts_under(self.root), reverse=True):  # deepest first
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def _detach_loops(self) -> None:
        for loop in loops_under(self.root):
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)

    def _release_host(self) -> None:
        """kubelet's cgroups and the host dirs the cluster made."""
        if self._owns_kubepods:
            # a container whose shim is gone (containerd died) still runs in its pod's cgroup
            for pid in _kubepods_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                wait_for("no process in kubelet's cgroups", lambda: not _kubepods_pids(), timeout=10)
            for top in _kubepods():
                # kubelet's pod cgroups, deepest first (rmdir of a cgroup removes its control files)
                for d in sorted(top.rglob("*/"), key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(OSError):
                    top.rmdir()
            with contextlib.suppress(FileNotFoundError):  # kubelet's own, and kubelet was ours
                pathlib.Path("/var/lib/kubelet/device-plugins/kubelet.sock").unlink()
        for top in self._created_host_dirs:
            # only what is empty now: another containerd on this host may have come to share
            # /run/containerd since (its shim sockets live there too)
            for d in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()

    def _leftovers(self) -> list[str]:
        problems = []
        if pids := _procs_naming(f"{self.root}/"):
            problems.append(f"processes still running under {self.root}: {pids}")
        if mounts := _mounts_under(self.root):
            problems.append(f"still mounted: {mounts}")
        if loops := loops_under(self.root):
            problems.append(f"loop devices still attached: {loops}")
        if self._owns_kubepods and (cgroups := [str(p) for p in _kubepods()]):
            problems.append(f"cgroups left: {cgroups}")
        kubelet_dir = pathlib.Path("/var/lib/kubelet")
        if kubelet_dir in self._created_host_dirs and kubelet_dir.exists():
            problems.append(f"{kubelet_dir} left: {sorted(map(str, kubelet_dir.rglob('*')))}")
        if self._iptables_before is not None and _iptables() != self._iptables_before:
            problems.append("the host's iptables rules changed while the cluster ran")
        return problems

    def _stop(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """For the cluster fixture's whole life: its daemons run in sessions of their own (a Ctrl-C at
    the terminal reaches pytest alone, which then tears down in order), so a SIGTERM that ended
    pytest outright (a cancelled CI job, `timeout`) would leave every one of them running. Here it
    interrupts like a Ctrl-C, and the teardown runs."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stopped_on_interrupt(cluster: Cluster) -> Iterator[None]:
    """For the teardown of a fixture that uses the cluster: pytest runs no other fixture's teardown
    once one raises KeyboardInterrupt (a Ctrl-C during the minutes a driver's uninstall may take),
    so the cluster fixture's stop() would never come; it runs here then, and the interrupt goes on."""
    try:
        yield
    except KeyboardInterrupt:
        cluster.stop()
        raise


@contextlib.contextmanager
def running(root: pathlib.Path, bin_dir: pathlib.Path) -> Iterator[Cluster]:
    cluster = Cluster(root=root, bin=bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        problems = cluster.stop()
        assert not problems, problems
