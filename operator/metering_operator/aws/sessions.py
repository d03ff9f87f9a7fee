"""boto3 sessions that share one botocore data loader (one copy of the endpoint data per process).

Each ``boto3.Session()`` has its own botocore loader, and the first client a session builds loads
and keeps ``endpoints.json`` and the service model: about 6.7 MiB of Python dicts per session. The
operator builds clients from several places (the gate's shared Metering client and STS exchanger,
metering's client, License Manager), each with a session of its own: the same data held two or
three times from the start (measured with tracemalloc; bench/results/memory.md). Sessions made here
are still separate (credentials, events, config) but read through one loader, whose cache is keyed
by what it loaded, so the data is loaded and kept once.
"""

from __future__ import annotations

import threading

import boto3
import botocore.loaders
import botocore.session

_lock = threading.Lock()
_loader: botocore.loaders.Loader | None = None


def shared_loader() -> botocore.loaders.Loader:
    global _loader
    with _lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        return _loader


def new_session() -> boto3.Session:
    """A new ``boto3.Session`` (default credential chain and config) on the process's shared loader."""
    loader = shared_loader()
    core = botocore.session.get_session()
    core.register_component("data_loader", loader)
    session = boto3.Session(botocore_session=core)
    with _lock:
        # boto3 appends its resource-model directory to the loader's search path per session:
        # on a shared loader, keep one copy of each path.
        loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))
    return session
