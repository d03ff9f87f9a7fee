"""Run the real Helm CLI (built with the local control plane) against the chart.

Helm's cache, config and data directories are pointed at a private temporary directory so tests
never read or change the developer's Helm repositories or plugins.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "marketplace-metering-operator"
CRD_SOURCE = REPO / "manifests" / "crd"
POLICY_SOURCE = REPO / "manifests" / "admission" / "policy-fragments.yaml"
CHART_POLICIES = CHART / "files" / "admission-policies.yaml"
INSTALL_BUNDLE = REPO / "manifests" / "install" / "marketplace-metering-operator.yaml"
# The release name and namespace the install bundle is rendered for.
BUNDLE_RELEASE = "marketplace-metering-operator"
BUNDLE_NAMESPACE = "marketplace-metering"
# The plain-YAML bundle targets Kubernetes >= 1.36, where a MutatingAdmissionPolicy adds the gate:
# no webhook, so no private key to generate per install (committing one would give every cluster
# the same key) and no cert-manager. Older servers: install the chart, which picks the webhook.
BUNDLE_SET = ("admissionPolicies.gate=policy",)


class HelmError(RuntimeError):
    def __init__(self, args: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"helm {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.returncode = result.returncode


def kube_version() -> str:
    """The local cluster's Kubernetes version, for commands that render without a cluster.

    Offline, Helm checks the chart's kubeVersion against the version compiled into it, which a
    Helm built from Go modules without release ldflags reports as v1.20.0.
    """
    from devtools.cluster import pinned_versions

    return pinned_versions()["k8s"]


@dataclass(frozen=True)
class Helm:
    binary: Path
    home: Path
    kubeconfig: Path | None = None

    def env(self) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        offline = (
            ["--kube-version", kube_version()]
            if args and args[0] in ("template", "lint") and "--kube-version" not in args
            else []
        )
        result = subprocess.run(
            [str(self.binary), *args, *offline],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise HelmError(args, result)
        return result

    def template(
        self,
        *,
        release: str = "mmo",
        namespace: str = "default",
        values: Mapping[str, Any] | None = None,
        set_values: Iterable[str] = (),
        extra: Iterable[str] = (),
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        args = ["template", release, str(CHART), "--namespace", namespace, *extra]
        args += _values_args(self.home, values, set_values)
        return self.run(*args, check=check)

    def render(self, **kwargs: Any) -> list[dict[str, Any]]:
        """`helm template` parsed into objects (empty documents dropped)."""
        return [doc for doc in yaml.safe_load_all(self.template(**kwargs).stdout) if doc]

    def install(
        self,
        release: str,
        namespace: str,
        *,
        values: Mapping[str, Any] | None = None,
        set_values: Iterable[str] = (),
        upgrade: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        verb = ["upgrade", release, str(CHART)] if upgrade else ["install", release, str(CHART)]
        args = [*verb, "--namespace", namespace, "--timeout", "120s"]
        args += _values_args(self.home, values, set_values)
        return self.run(*args)

    def notes(
        self, release: str = "mmo", namespace: str = "default", *, set_values: Iterable[str] = ()
    ) -> str:
        """The install notes (NOTES.txt) as `helm install` prints them, from a server-side dry run.

        `helm template` never renders NOTES.txt, and a client-side dry run judges the chart's
        kubeVersion by the version compiled into Helm; so this needs the cluster (kubeconfig).
        """
        args = ["install", release, str(CHART), "--namespace", namespace, "--dry-run=server"]
        out = self.run(*args, *_values_args(self.home, None, set_values)).stdout
        return out[out.index("NOTES:") :]

    def uninstall(self, release: str, namespace: str) -> subprocess.CompletedProcess[str]:
        return self.run("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")

    def manifest(self, release: str, namespace: str) -> list[dict[str, Any]]:
        out = self.run("get", "manifest", release, "--namespace", namespace).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def status(self, release: str, namespace: str) -> dict[str, Any]:
        out = self.run("status", release, "--namespace", namespace, "--output", "json").stdout
        result: dict[str, Any] = json.loads(out)
        return result


def _values_args(home: Path, values: Mapping[str, Any] | None, set_values: Iterable[str]) -> list[str]:
    args: list[str] = []
    if values:
        home.mkdir(parents=True, exist_ok=True)
        # One file per distinct content, so concurrent calls never share a half-written file.
        text = yaml.safe_dump(dict(values))
        path = home / f"values-{abs(hash(text))}.yaml"
        path.write_text(text)
        args += ["--values", str(path)]
    for item in set_values:
        args += ["--set", item]
    return args


def by_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


def one(objects: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys (which PyYAML and Helm silently accept)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def strict_load_all(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc]
