"""Run the operator's image with podman the way the chart's Deployment runs it in a pod.

The pod spec comes from the installed Helm release (``helm get manifest``), so the container gets
the chart's own args, env, user, read-only root filesystem, dropped capabilities and volumes:

* the ServiceAccount token the kubelet would mount at ``/var/run/secrets/kubernetes.io/
  serviceaccount`` (a TokenRequest for the chart's ServiceAccount, the cluster CA, the namespace),
  with ``KUBERNETES_SERVICE_HOST``/``PORT`` pointing at the local API server, so the Kubernetes
  client takes its in-cluster path;
* each ``secret`` volume (the webhook's TLS pair) read from the cluster, each projected
  ``serviceAccountToken`` (the operator's own web identity) minted with its audience, and each
  ``emptyDir`` as a tmpfs, mode 0440 files owned by the pod's fsGroup like the kubelet writes them.

The container uses the host's network (the API server and the emulator listen on 127.0.0.1) and
Debian's runc (crun refuses these machines' cgroup layout) with explicit ulimits (the host's hard
limits cannot be raised).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.cluster import ClusterInfo
from devtools.image import runtime
from kubernetes import client

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")


@dataclass
class Container:
    name: str
    cmd: list[str]
    mounts: dict[str, Path] = field(default_factory=dict)

    def start(self) -> Container:
        subprocess.run(self.cmd, check=True, capture_output=True, text=True)
        return self

    def podman(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", "--runtime", runtime(), *args], capture_output=True, text=True, check=check
        )

    def running(self) -> bool:
        done = self.podman("inspect", "--format", "{{.State.Running}}", self.name)
        return done.stdout.strip() == "true"

    def log(self) -> str:
        done = self.podman("logs", self.name)
        return done.stdout + done.stderr

    def exec(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", self.name, *args)

    def stop(self) -> None:
        self.podman("rm", "--force", "--time", "10", self.name)


def _deployment(manifest: str) -> dict[str, Any]:
    import yaml

    for doc in yaml.safe_load_all(manifest):
        if doc and doc.get("kind") == "Deployment":
            return dict(doc)
    raise AssertionError("the release has no Deployment")


def _write(directory: Path, files: dict[str, bytes], uid: int, gid: int) -> Path:
    """Files as the kubelet writes a volume: mode 0440, readable by the pod's fsGroup."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        os.chown(path, uid, gid)
        os.chmod(path, 0o440)
    return directory


def _token(kube: client.ApiClient, namespace: str, sa: str, audience: str, seconds: int) -> bytes:
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[audience], expiration_seconds=seconds)
    )
    answer = client.CoreV1Api(kube).create_namespaced_service_account_token(sa, namespace, request)
    return str(answer.status.token).encode()


def chart_container(
    cluster: ClusterInfo,
    kube: client.ApiClient,
    manifest: str,
    image: str,
    work: Path,
) -> Container:
    """The podman command that runs the release's operator container as its pod would run."""
    deployment = _deployment(manifest)
    namespace = deployment["metadata"]["namespace"]
    pod = deployment["spec"]["template"]["spec"]
    (spec,) = pod["containers"]
    assert spec["image"] == image, f"the chart runs {spec['image']}, the build made {image}"
    pod_security = pod.get("securityContext") or {}
    security = spec.get("securityContext") or {}
    uid = int(security.get("runAsUser", pod_security.get("runAsUser", 0)))
    gid = int(security.get("runAsGroup", pod_security.get("runAsGroup", uid)))
    fs_group = int(pod_security.get("fsGroup", gid))
    sa = pod["serviceAccountName"]
    name = f"mmo-test-{uuid.uuid4().hex[:10]}"
    pod_name = f"{deployment['metadata']['name']}-{uuid.uuid4().hex[:5]}"
    if work.exists():
        shutil.rmtree(work)

    cmd = ["podman", "--runtime", runtime(), "run", "--detach", "--name", name, "--network", "host"]
    cmd += [f"--ulimit={limit}" for limit in ULIMITS]
    cmd += ["--user", f"{uid}:{gid}", "--group-add", str(fs_group)]
    if security.get("readOnlyRootFilesystem"):
        cmd.append("--read-only")
    if security.get("allowPrivilegeEscalation") is False:
        cmd += ["--security-opt", "no-new-privileges"]
    for cap in (security.get("capabilities") or {}).get("drop") or []:
        cmd += ["--cap-drop", cap]

    # The API server as a pod sees it, and the automounted ServiceAccount token.
    server = urllib.parse.urlsplit(cluster.server)
    cmd += ["--env", f"KUBERNETES_SERVICE_HOST={server.hostname}"]
    cmd += ["--env", f"KUBERNETES_SERVICE_PORT={server.port}"]
    mounts: dict[str, Path] = {}
    if pod.get("automountServiceAccountToken", True):
        mounts[SA_DIR] = _write(
            work / "serviceaccount",
            {
                "token": _token(kube, namespace, sa, cluster.issuer, 3600),
                "ca.crt": cluster.ca_file.read_bytes(),
                "namespace": namespace.encode(),
            },
            0,
            fs_group,
        )

    for var in spec.get("env") or []:
        if "value" in var:
            value = str(var["value"])
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            value = {"metadata.namespace": namespace, "metadata.name": pod_name}[path]
        cmd += ["--env", f"{var['name']}={value}"]

    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    core = client.CoreV1Api(kube)
    for mount in spec.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        target = mount["mountPath"]
        if "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit", "64Mi").replace("Mi", "m")
            cmd += ["--tmpfs", f"{target}:rw,size={size},mode=1777"]
            continue
        if "secret" in volume:
            secret = core.read_namespaced_secret(volume["secret"]["secretName"], namespace)
            files = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        elif "projected" in volume:
            files = {}
            for source in volume["projected"]["sources"]:
                token = source["serviceAccountToken"]
                files[token["path"]] = _token(
                    kube, namespace, sa, token["audience"], int(token["expirationSeconds"])
                )
        else:
            raise AssertionError(f"volume {volume} is not understood by this runner")
        mounts[target] = _write(work / mount["name"], files, 0, fs_group)
    for target, source in mounts.items():
        cmd += ["--volume", f"{source}:{target}:ro"]

    cmd.append(image)
    cmd += list(spec.get("args") or [])
    return Container(name, cmd, mounts)
