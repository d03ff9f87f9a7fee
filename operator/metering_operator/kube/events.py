"""Kubernetes Events (core/v1) on pods and MeteredProducts, so `kubectl describe` explains.

Posted from worker threads through the sync client (kopf's own event helpers need its event
loop's context). A failure to post an Event is logged, never fatal: Events are best-effort.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal

from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.domain.conditions import format_time
from metering_operator.kube.rawapi import RawApi, segment

log = logging.getLogger(__name__)
COMPONENT = "marketplace-metering-operator"
EventType = Literal["Normal", "Warning"]


class EventPoster:
    def __init__(self, api: client.ApiClient) -> None:
        self.raw = RawApi(api)
        self.instance = f"{socket.gethostname()}-{os.getpid()}"
        self.posted = 0

    def post(self, ref: Mapping[str, str], type_: EventType, reason: str, message: str) -> None:
        now = datetime.now(UTC)
        namespace = ref.get("namespace") or "default"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.get('name', 'object')}.", "namespace": namespace},
            "involvedObject": dict(ref),
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.instance,
            "firstTimestamp": format_time(now),
            "lastTimestamp": format_time(now),
            "count": 1,
        }
        try:
            # Raw JSON (kube/rawapi.py): one Event per granted pod is on the gate's hot path.
            self.raw.exchange("POST", f"/api/v1/namespaces/{segment(namespace)}/events", body)
            self.posted += 1
        except ApiException as exc:
            log.warning(
                "could not post event %s on %s/%s: %s", reason, namespace, ref.get("name"), exc.reason
            )
