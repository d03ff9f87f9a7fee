"""boto3 sessions that share one botocore data loader (one copy of the endpoint data per process).

Each ``boto3.Session()`` has its own botocore loader, and the first client a session builds loads
and keeps ``endpoints.json`` and the service model: about 6.7 MiB of Python dicts per session. The
operator builds clients from several places (the gate's shared Metering client and STS exchanger,
metering's client, License Manager), each with a session of its own: the same data held two or
three times from the start (measured with tracemalloc; bench/results/memory.md). Sessions made here
are still separate (credentials, events, config) but read through one loader, whose cache is keyed
by what it loaded, so the data is loaded and kept once. Their clients parse timestamps with
:func:`parse_aws_timestamp`.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore.utils import parse_timestamp

_lock = threading.Lock()
_loader: botocore.loaders.Loader | None = None


def parse_aws_timestamp(value: Any) -> datetime:
    """botocore's timestamp parser, with ISO 8601 (what STS and JSON services answer) done by the
    standard library: botocore's default goes through dateutil, about 90 us per value, which was
    3% of the operator's CPU per gated pod (each AssumeRoleWithWebIdentity's ``Expiration``).
    Anything else, and a time without an offset, takes botocore's own path unchanged.
    """
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    result: datetime = parse_timestamp(value)
    return result


def shared_loader() -> botocore.loaders.Loader:
    global _loader
    with _lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        return _loader


def new_session() -> boto3.Session:
    """A new ``boto3.Session`` (default credential chain and config) on the process's shared loader,
    parsing timestamps with :func:`parse_aws_timestamp`."""
    loader = shared_loader()
    core = botocore.session.get_session()
    core.register_component("data_loader", loader)
    # botocore's documented seam for the response parsers' defaults.
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_aws_timestamp)
    session = boto3.Session(botocore_session=core)
    with _lock:
        # boto3 appends its resource-model directory to the loader's search path per session:
        # on a shared loader, keep one copy of each path.
        loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))
    return session
