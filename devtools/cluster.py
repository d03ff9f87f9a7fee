"""The local Kubernetes control plane: real upstream binaries, fake nodes, no Docker.

`python -m devtools.cluster up|down|status|env`

`up` builds the binaries once per machine (devtools/build-control-plane.sh caches them by
version), then starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the
KWOK controller as detached processes logging under ``<repo>/.local/cluster`` and creates fake
nodes that KWOK keeps Ready and whose bound pods it turns Running. It reuses a healthy running
cluster, and otherwise cleans stale state and starts fresh. Its last stdout line is
``KUBECONFIG=<absolute path>``.

The API server is its own OIDC issuer (``https://127.0.0.1:<port>``) and, as EKS's public OIDC
endpoint is, its discovery documents are readable anonymously, so the AWS emulator can fetch
``<issuer>/openid/v1/jwks`` the way STS does.

Python callers use :class:`LocalCluster` (``up() -> ClusterInfo``, ``down()``) and
:func:`bin_path` for kubectl/helm. Test sessions use ``acquire``/``release`` so that several
sessions can share one cluster and only the last one out stops a cluster a test started.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from devtools import cluster_procs as procs
from devtools.cluster_http import ClusterStartError, KubeHttp, reachable, wait_for
from devtools.cluster_pki import ClientIdentity, Pki, write_pki

REPO_ROOT = Path(__file__).resolve().parent.parent
# MMO_CLUSTER_STATE_DIR gives a second, independent cluster (e.g. a CI job beside a dev cluster).
DEFAULT_STATE_DIR = Path(os.environ.get("MMO_CLUSTER_STATE_DIR") or REPO_ROOT / ".local" / "cluster")
BUILD_SCRIPT = REPO_ROOT / "devtools" / "build-control-plane.sh"
KWOK_STAGES = REPO_ROOT / "devtools" / "kwok" / "stages.yaml"

# KWOK manages only nodes carrying this annotation (its documented convention).
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
NODE_CAPACITY = {"cpu": "32", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "1Ti"}
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"

ADMIN = ClientIdentity("admin", "kubernetes-admin", ("system:masters",))
CONTROLLER_MANAGER = ClientIdentity("kube-controller-manager", "system:kube-controller-manager")
SCHEDULER = ClientIdentity("kube-scheduler", "system:kube-scheduler")
# KWOK plays every kubelet at once (node status, leases, pod status, final pod deletion), which
# no single bootstrap role covers; it is a dev-only fake, so it runs as a cluster admin.
KWOK = ClientIdentity("kwok", "kwok-controller", ("system:masters",))

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

START_TIMEOUT = float(os.environ.get("MMO_CLUSTER_START_TIMEOUT", "180"))


def _log(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S', time.gmtime())}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Binaries


def pinned_versions() -> dict[str, str]:
    """Component versions as the build script resolves them (its defaults, or env overrides)."""
    text = BUILD_SCRIPT.read_text()
    versions = {}
    for name, default in re.findall(r'^([A-Z0-9]+)_VERSION="\$\{\1_VERSION:-([^}]+)\}"', text, re.M):
        versions[name.lower()] = os.environ.get(f"{name}_VERSION", default)
    return versions


@functools.cache
def bin_dir() -> Path:
    """Directory of the cached binaries, building them first if this machine has none.

    ``MMO_BIN_DIR`` points at prebuilt binaries instead (e.g. a CI cache restored elsewhere).
    """
    override = os.environ.get("MMO_BIN_DIR")
    if override:
        return Path(override).resolve()
    # The script logs progress on stderr (inherited, so the user sees a long first build) and
    # prints the directory as its last stdout line.
    out = subprocess.run([str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines:
        raise ClusterStartError(f"{BUILD_SCRIPT} printed no binary directory")
    return Path(lines[-1].strip())


def bin_path(name: str) -> Path:
    """Absolute path of one cached binary: etcd, kube-apiserver, kubectl, kwok, helm, ..."""
    path = bin_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not among the control-plane binaries in {path.parent}")
    return path


# ---------------------------------------------------------------------------------------------
# What a running cluster looks like from outside


@dataclass(frozen=True)
class ClusterInfo:
    """How to reach a running local cluster (also saved as ``cluster.json`` in its state dir)."""

    kubeconfig: Path
    server: str
    ca_file: Path
    issuer: str
    jwks_uri: str
    bin_dir: Path
    state_dir: Path
    nodes: tuple[str, ...]

    def env(self) -> dict[str, str]:
        """Variables for child processes: kubeconfig, CA, issuer/JWKS, binaries first on PATH."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "MMO_CLUSTER_SERVER": self.server,
            "MMO_CLUSTER_CA_FILE": str(self.ca_file),
            "MMO_CLUSTER_ISSUER": self.issuer,
            "MMO_CLUSTER_JWKS_URI": self.jwks_uri,
            "MMO_CLUSTER_BIN_DIR": str(self.bin_dir),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in data.items()
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterInfo:
        return cls(
            kubeconfig=Path(data["kubeconfig"]),
            server=data["server"],
            ca_file=Path(data["ca_file"]),
            issuer=data["issuer"],
            jwks_uri=data["jwks_uri"],
            bin_dir=Path(data["bin_dir"]),
            state_dir=Path(data["state_dir"]),
            nodes=tuple(data["nodes"]),
        )


@dataclass(frozen=True)
class _Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int


def _kubeconfig(server: str, ca_file: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    # Data is embedded, not referenced, so the file works from any working directory and can
    # be copied (e.g. into a Helm test's environment) on its own.
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "mmo-local", "cluster": {"server": server, "certificate-authority-data": b64(ca_file)}}
        ],
        "users": [
            {"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}
        ],
        "contexts": [{"name": "mmo-local", "context": {"cluster": "mmo-local", "user": user}}],
        "current-context": "mmo-local",
        "preferences": {},
    }


def _wait_process_url(comp: procs.Component, url: str, ctx: ssl.SSLContext | None = None) -> None:
    """Wait until ``url`` answers 200, failing early (with its log) if the process dies."""
    wait_for(
        f"{comp.name} {url}",
        lambda: reachable(url, ctx),
        START_TIMEOUT,
        on_timeout=lambda: procs.log_tail(comp),
        still_running=lambda: procs.alive_pid(comp) is not None,
    )


# ---------------------------------------------------------------------------------------------
# The cluster


class ClusterBusyError(RuntimeError):
    """`down` was asked while test sessions still use the cluster."""


class LocalCluster:
    """Start, reuse, inspect and stop the local control plane kept in ``state_dir``."""

    def __init__(
        self,
        state_dir: Path = DEFAULT_STATE_DIR,
        *,
        node_count: int = 3,
        log: Callable[[str], None] = _log,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.node_count = node_count
        self.log = log
        self.info_file = self.state_dir / "cluster.json"
        self.kubeconfig = self.state_dir / "kubeconfig"
        # Outside the state dir: `down` deletes that, and the lock must outlive it.
        self.lock_file = self.state_dir.parent / f"{self.state_dir.name}.lock"

    # -- locking and bookkeeping ---------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise up/down/acquire/release across processes (parallel test sessions)."""
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        with self.lock_file.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _component(self, name: str, binary: Path) -> procs.Component:
        return procs.Component(
            name=name,
            pid_file=self.state_dir / "run" / f"{name}.pid",
            log_file=self.state_dir / "logs" / f"{name}.log",
            binary=binary,
        )

    def _recorded(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.info_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data

    def _recorded_components(self) -> list[procs.Component]:
        data = self._recorded()
        binaries: dict[str, str] = (data or {}).get("binaries", {})
        return [self._component(name, Path(binaries[name])) for name in COMPONENTS if name in binaries]

    def info(self) -> ClusterInfo | None:
        """The saved connection details, or None if no cluster was started here."""
        data = self._recorded()
        return None if data is None else ClusterInfo.from_json(data["info"])

    def component_status(self) -> dict[str, int | None]:
        """Each recorded component's live pid (None if it is not running)."""
        return {c.name: procs.alive_pid(c) for c in self._recorded_components()}

    def is_healthy(self, patience: float = 20.0) -> bool:
        """All five processes alive and the API server ready.

        With every process alive, a slow /readyz (a busy 2-core machine) is retried for
        ``patience`` seconds: tearing down a cluster other sessions use is far costlier.
        """
        info = self.info()
        status = self.component_status()
        if info is None or set(status) != set(COMPONENTS) or None in status.values():
            return False
        http = KubeHttp(info.server, info.ca_file, timeout=5)
        deadline = time.monotonic() + patience
        while True:
            try:
                if http.get("/readyz").status == 200:
                    return True
            except OSError:
                pass
            if time.monotonic() > deadline or None in self.component_status().values():
                return False
            time.sleep(0.5)

    # -- up ------------------------------------------------------------------------------------

    def up(self, *, started_by: str = "cli") -> ClusterInfo:
        """Reuse the running healthy cluster or start a fresh one; returns how to reach it."""
        with self._locked():
            info, _ = self._up_locked(started_by)
            return info

    def _up_locked(self, started_by: str) -> tuple[ClusterInfo, bool]:
        if self.is_healthy():
            info = self.info()
            assert info is not None
            # Someone asked for the cluster by hand: a test session must not stop it later.
            if started_by == "cli":
                self._set_started_by("cli")
            self.log(f"reusing the running cluster at {info.server}")
            return info, False
        self._stop_all()
        t0 = time.monotonic()
        binaries = bin_dir()
        self.log(f"binaries: {binaries}")
        try:
            info = self._start(binaries, started_by)
        except BaseException:
            self.log(f"start failed; logs kept in {self.state_dir / 'logs'}")
            self._stop_processes()
            raise
        self.log(f"cluster ready in {time.monotonic() - t0:.1f}s")
        return info, True

    def _set_started_by(self, who: str) -> None:
        data = self._recorded()
        if data is not None and data.get("started_by") != who:
            data["started_by"] = who
            self.info_file.write_text(json.dumps(data, indent=2))

    def _start(self, binaries: Path, started_by: str) -> ClusterInfo:
        t0 = time.monotonic()
        for sub in ("run", "logs"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        pki = write_pki(self.state_dir / "pki", [ADMIN, CONTROLLER_MANAGER, SCHEDULER, KWOK])
        p = _Ports(*procs.free_ports(6))
        server = f"https://127.0.0.1:{p.apiserver}"
        info = ClusterInfo(
            kubeconfig=self.kubeconfig,
            server=server,
            ca_file=pki.server_ca,
            issuer=server,
            jwks_uri=f"{server}/openid/v1/jwks",
            bin_dir=binaries,
            state_dir=self.state_dir,
            nodes=tuple(f"kwok-node-{i}" for i in range(self.node_count)),
        )
        kubeconfigs = self._write_kubeconfigs(info, pki)
        comps = {name: self._component(name, binaries / name) for name in COMPONENTS}
        self.info_file.write_text(
            json.dumps(
                {
                    "info": info.to_json(),
                    "ports": asdict(p),
                    "binaries": {n: str(c.binary) for n, c in comps.items()},
                    "started_by": started_by,
                    "versions": pinned_versions(),
                },
                indent=2,
            )
        )
        self.log(f"certificates and kubeconfigs written ({time.monotonic() - t0:.1f}s)")

        self._start_etcd(comps["etcd"], p)
        self._start_apiserver(comps["kube-apiserver"], p, info, pki)
        admin = KubeHttp(server, pki.server_ca, pki.client_cert("admin"), pki.client_key("admin"))
        self._bootstrap_objects(admin)

        # The rest only need a ready API server; start them together and wait for them together.
        state = self.state_dir
        cm, sched, kwok = comps["kube-controller-manager"], comps["kube-scheduler"], comps["kwok"]
        procs.start(
            cm,
            [
                f"--kubeconfig={kubeconfigs['kube-controller-manager']}",
                f"--authentication-kubeconfig={kubeconfigs['kube-controller-manager']}",
                f"--authorization-kubeconfig={kubeconfigs['kube-controller-manager']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.controller_manager}",
                f"--cert-dir={state / 'kube-controller-manager'}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.server_ca}",
                # Client-cert CSRs (kubectl certificate approve) work like on a real cluster.
                f"--cluster-signing-cert-file={pki.client_ca}",
                f"--cluster-signing-key-file={pki.client_ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                # The default client limit (20 requests/s) makes ReplicaSets create pods slower than
                # the tests and benchmarks create Deployments; a local cluster can afford more.
                "--kube-api-qps=200",
                "--kube-api-burst=400",
            ],
        )
        procs.start(
            sched,
            [
                f"--kubeconfig={kubeconfigs['kube-scheduler']}",
                f"--authentication-kubeconfig={kubeconfigs['kube-scheduler']}",
                f"--authorization-kubeconfig={kubeconfigs['kube-scheduler']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.scheduler}",
                f"--cert-dir={state / 'kube-scheduler'}",
                "--leader-elect=false",
            ],
        )
        procs.start(
            kwok,
            [
                f"--kubeconfig={kubeconfigs['kwok']}",
                f"--config={KWOK_STAGES}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector={}={}".format(*FAKE_NODE_ANNOTATION),
                f"--cidr={POD_CIDR}",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{p.kwok}",
            ],
            # kwok also reads ~/.kwok/kwok.yaml when present; a private HOME keeps a developer's
            # own kwok configuration out of the harness.
            env={**os.environ, "HOME": str(state / "kwok-home")},
        )
        self._create_nodes(admin, info.nodes)
        self.log("started kube-controller-manager, kube-scheduler, kwok; created fake nodes")

        # Self-signed serving certs on the components' own ports: only liveness is asked of them.
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        for comp, port in ((cm, p.controller_manager), (sched, p.scheduler)):
            _wait_process_url(comp, f"https://127.0.0.1:{port}/healthz", insecure)
        self.log(f"controller-manager and scheduler healthy ({time.monotonic() - t0:.1f}s)")
        wait_for(
            "fake nodes Ready (kwok)",
            lambda: self._nodes_ready(admin, info.nodes),
            START_TIMEOUT,
            on_timeout=lambda: procs.log_tail(kwok),
            still_running=lambda: procs.alive_pid(kwok) is not None,
        )
        # Pods in fresh namespaces need the `default` ServiceAccount, which only the
        # controller manager creates; seeing it in `default` proves that loop runs.
        wait_for(
            "default ServiceAccount (kube-controller-manager)",
            lambda: admin.get("/api/v1/namespaces/default/serviceaccounts/default").status == 200,
            START_TIMEOUT,
            on_timeout=lambda: procs.log_tail(cm),
        )
        self.log(f"{len(info.nodes)} fake nodes Ready ({time.monotonic() - t0:.1f}s)")
        from devtools.local_aws import write_emulator_config

        # The emulator configuration for this cluster's issuer (README "Running the operator").
        self.log(f"emulator: metering-operator emulator --config {write_emulator_config(info)}")
        return info

    def _write_kubeconfigs(self, info: ClusterInfo, pki: Pki) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        conf_dir = self.state_dir / "kubeconfigs"
        conf_dir.mkdir(parents=True, exist_ok=True)
        for ident in (CONTROLLER_MANAGER, SCHEDULER, KWOK):
            path = conf_dir / f"{ident.stem}.kubeconfig"
            conf = _kubeconfig(
                info.server,
                pki.server_ca,
                pki.client_cert(ident.stem),
                pki.client_key(ident.stem),
                ident.user,
            )
            path.write_text(yaml.safe_dump(conf))
            path.chmod(0o600)
            paths[ident.stem] = path
        conf = _kubeconfig(
            info.server, pki.server_ca, pki.client_cert("admin"), pki.client_key("admin"), ADMIN.user
        )
        self.kubeconfig.write_text(yaml.safe_dump(conf))
        self.kubeconfig.chmod(0o600)
        return paths

    def _start_etcd(self, etcd: procs.Component, p: _Ports) -> None:
        client = f"http://127.0.0.1:{p.etcd_client}"
        peer = f"http://127.0.0.1:{p.etcd_peer}"
        # Plain HTTP on loopback only: nothing but the API server talks to it.
        procs.start(
            etcd,
            [
                "--name=mmo-local",
                f"--data-dir={self.state_dir / 'etcd-data'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=mmo-local={peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        _wait_process_url(etcd, f"{client}/health")
        self.log("etcd healthy")

    def _start_apiserver(self, api: procs.Component, p: _Ports, info: ClusterInfo, pki: Pki) -> None:
        procs.start(
            api,
            [
                f"--etcd-servers=http://127.0.0.1:{p.etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={p.apiserver}",
                f"--cert-dir={self.state_dir / 'kube-apiserver'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.client_ca}",
                "--authorization-mode=Node,RBAC",
                # Anonymous requests stay on so the OIDC discovery documents can be public (the
                # binding made in _bootstrap_objects); RBAC still denies them everything else.
                "--anonymous-auth=true",
                f"--service-account-issuer={info.issuer}",
                f"--service-account-jwks-uri={info.jwks_uri}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # A loopback address is not a valid Endpoints address; nothing in-cluster dials
                # the `kubernetes` Service here (no real pods), so skip reconciling it.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
        )
        http = KubeHttp(info.server, pki.server_ca, timeout=3)
        wait_for(
            "kube-apiserver /readyz",
            lambda: http.get("/readyz").status == 200,
            START_TIMEOUT,
            interval=0.2,
            on_timeout=lambda: procs.log_tail(api),
            still_running=lambda: procs.alive_pid(api) is not None,
        )
        self.log(f"kube-apiserver ready at {info.server}")

    def _bootstrap_objects(self, admin: KubeHttp) -> None:
        # EKS serves the OIDC discovery and JWKS publicly; so does this cluster, so the AWS
        # emulator can fetch <issuer>/openid/v1/jwks anonymously as STS does.
        admin.create(
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "mmo-local:service-account-issuer-discovery-public"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "system:service-account-issuer-discovery",
                },
                "subjects": [
                    {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Group",
                        "name": "system:unauthenticated",
                    }
                ],
            },
        )

    def _create_nodes(self, admin: KubeHttp, names: tuple[str, ...]) -> None:
        key, value = FAKE_NODE_ANNOTATION
        for i, name in enumerate(names):
            admin.create(
                "/api/v1/nodes",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
                        "labels": {
                            "type": "kwok",
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "node-role.kubernetes.io/agent": "",
                            "topology.kubernetes.io/zone": f"local-{chr(ord('a') + i % 3)}",
                        },
                    },
                    # No taint: every node here is fake, so ordinary Deployments should land on them.
                    "spec": {},
                    # Capacity given at creation is kept by KWOK's node-initialize stage.
                    "status": {
                        "allocatable": NODE_CAPACITY,
                        "capacity": NODE_CAPACITY,
                        "addresses": [
                            {"type": "InternalIP", "address": f"10.240.0.{i + 1}"},
                            {"type": "Hostname", "address": name},
                        ],
                    },
                },
            )

    @staticmethod
    def _nodes_ready(admin: KubeHttp, names: tuple[str, ...]) -> bool:
        resp = admin.get("/api/v1/nodes")
        if resp.status != 200:
            return False
        ready = set()
        for node in resp.body.get("items", []):
            for cond in node.get("status", {}).get("conditions") or []:
                if cond.get("type") == "Ready" and cond.get("status") == "True":
                    ready.add(node["metadata"]["name"])
        return set(names) <= ready

    # -- down ----------------------------------------------------------------------------------

    def down(self, *, force: bool = False) -> None:
        """Stop every component and delete the state directory.

        Refuses (ClusterBusyError) while test sessions are registered as using the cluster,
        unless forced: in a shared work tree, someone else's test run may be mid-way.
        """
        with self._locked():
            users = self._live_users()
            if users and not force:
                raise ClusterBusyError(
                    f"{len(users)} test session(s) still use this cluster (pids {', '.join(users)}); "
                    "wait for them or use `down --force`"
                )
            self._stop_all()

    def _stop_processes(self) -> None:
        comps = self._recorded_components()
        running = [c.name for c in comps if procs.alive_pid(c) is not None]
        if running:
            self.log(f"stopping {', '.join(running)}")
        # Clients and API server first (their shutdown may still write to etcd), etcd last.
        procs.stop([c for c in comps if c.name != "etcd"])
        procs.stop([c for c in comps if c.name == "etcd"])

    def _stop_all(self) -> None:
        if self.state_dir.exists():
            self._stop_processes()
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- sharing between test sessions ---------------------------------------------------------

    def _users_dir(self) -> Path:
        return self.state_dir / "users"

    def acquire(self, user_pid: int) -> tuple[ClusterInfo, bool]:
        """Join (or start) the cluster as a test session; returns (info, started_here)."""
        with self._locked():
            info, started = self._up_locked("pytest")
            self._users_dir().mkdir(parents=True, exist_ok=True)
            (self._users_dir() / str(user_pid)).touch()
            return info, started

    def _live_users(self) -> list[str]:
        users = self._users_dir()
        if not users.is_dir():
            return []
        return sorted(p.name for p in users.iterdir() if Path(f"/proc/{p.name}").exists())

    def release(self, user_pid: int, *, keep: bool = False) -> bool:
        """Leave the cluster; stop it if a test started it and no live session still uses it.

        Returns True if this call stopped the cluster.
        """
        with self._locked():
            (self._users_dir() / str(user_pid)).unlink(missing_ok=True)
            data = self._recorded()
            if keep or data is None or data.get("started_by") != "pytest":
                return False
            others = self._live_users()
            if others:
                self.log(f"leaving the cluster running for {len(others)} other test session(s)")
                return False
            self._stop_all()
            return True


# ---------------------------------------------------------------------------------------------
# Command line


def _cmd_up(cluster: LocalCluster) -> int:
    t0 = time.monotonic()
    info = cluster.up()
    cluster.log(f"server:   {info.server}")
    cluster.log(f"CA:       {info.ca_file}")
    cluster.log(f"issuer:   {info.issuer}")
    cluster.log(f"JWKS:     {info.jwks_uri}")
    cluster.log(f"binaries: {info.bin_dir}")
    cluster.log(f"logs:     {info.state_dir / 'logs'}")
    from devtools.local_aws import write_emulator_config

    # Written at start; rewritten here so a cluster started by older code gets one too.
    cluster.log(f"emulator: metering-operator emulator --config {write_emulator_config(info)}")
    cluster.log(f"up in {time.monotonic() - t0:.1f}s")
    print(f"KUBECONFIG={info.kubeconfig}", flush=True)
    return 0


def _cmd_down(cluster: LocalCluster, force: bool) -> int:
    cluster.down(force=force)
    cluster.log(f"stopped; removed {cluster.state_dir}")
    return 0


def _cmd_status(cluster: LocalCluster) -> int:
    info = cluster.info()
    if info is None:
        print("no cluster")
        return 1
    for name, pid in cluster.component_status().items():
        print(f"{name:24} {'running pid ' + str(pid) if pid else 'NOT RUNNING'}")
    healthy = cluster.is_healthy()
    print(f"{'api server':24} {info.server} {'ready' if healthy else 'NOT READY'}")
    print(f"KUBECONFIG={info.kubeconfig}")
    return 0 if healthy else 1


def _cmd_env(cluster: LocalCluster) -> int:
    info = cluster.info()
    if info is None or not cluster.is_healthy():
        print("no running cluster; run `make cluster` first", file=sys.stderr)
        return 1
    for key, value in info.env().items():
        print(f"export {key}={_shell_quote(value)}")
    return 0


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--force", action="store_true", help="down: stop even while test sessions use it")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.state_dir)
    commands: dict[str, Callable[[LocalCluster], int]] = {
        "up": _cmd_up,
        "down": functools.partial(_cmd_down, force=args.force),
        "status": _cmd_status,
        "env": _cmd_env,
    }
    try:
        return commands[args.command](cluster)
    except (ClusterStartError, ClusterBusyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
