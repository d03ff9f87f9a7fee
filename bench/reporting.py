"""What every benchmark's ``main`` does the same way: the local cluster it runs on, the command
line its report names, and the report printed and written where ``--output`` says."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from devtools.cluster import ClusterInfo, LocalCluster
from kubernetes import config
from kubernetes.client import ApiClient


def publish(report: str, output: Path | None) -> int:
    """Print ``report``, write it to ``output`` when given; the exit status (0)."""
    print(report)
    if output:
        output.write_text(report)
    return 0


def command_line(command: str, argv: list[str] | None) -> str:
    """The command a report names: ``command`` and the arguments it was given."""
    return " ".join([command, *(argv if argv is not None else sys.argv[1:])])


def open_session(
    prefix: str, pool_size: int | None = None
) -> tuple[LocalCluster, ClusterInfo, ApiClient, Path]:
    """The local cluster acquired for this process (release it with ``cluster.release(os.getpid(),
    keep=True)``), an API client for it, and a fresh work directory for logs, announced."""
    cluster = LocalCluster()
    info, _ = cluster.acquire(os.getpid())
    work = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"logs in {work}", flush=True)
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    if pool_size is not None:
        api.configuration.connection_pool_maxsize = pool_size
    return cluster, info, api, work
