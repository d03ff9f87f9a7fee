"""README's first command works: ``python -m devtools.demo`` run as a user runs it.

The demo is started as a subprocess against the session's cluster (its state dir, so it joins
rather than starts one) in a namespace and work dir of its own, and judged by its exit code, the
story lines it prints (each step reached, with the facts that step is about) and what it leaves
behind: no operator process, no webhook configuration, no namespace, the cluster still running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from devtools.cluster import ClusterInfo, LocalCluster
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
GATE = "marketplace.metering.dev/entitlement"
RUN_TIMEOUT = 300.0


@dataclass
class DemoRun:
    namespace: str
    work_dir: Path
    returncode: int
    output: str
    steps: int = 14

    def step_text(self, number: int) -> str:
        """The lines of step ``number`` (from its header to the next step or the end)."""
        total = self.steps
        match = re.search(
            rf"^\[\s*{number}/{total}\].*?"
            rf"(?=^\[\s*{number + 1}/{total}\]|^Demo complete|^DEMO FAILED|^Cleaning up|\Z)",
            self.output,
            re.M | re.S,
        )
        assert match, f"step {number} never started:\n{self.output}"
        return match.group(0)


def demo_command(namespace: str, work_dir: Path, cluster: ClusterInfo, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "devtools.demo",
        "--namespace",
        namespace,
        "--work-dir",
        str(work_dir),
        "--cluster-state-dir",
        str(cluster.state_dir),
        *extra,
    ]


def run_demo(cluster: ClusterInfo, tmp_path: Path, *extra: str, steps: int = 14) -> DemoRun:
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    work_dir = tmp_path / "demo"
    done = subprocess.run(
        demo_command(namespace, work_dir, cluster, *extra),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    output = done.stdout + done.stderr
    print(output)  # shown by pytest when the test fails
    return DemoRun(namespace, work_dir, done.returncode, output, steps)


def assert_cleaned_up(kube: client.ApiClient, cluster: ClusterInfo, run: DemoRun) -> None:
    """Nothing of the demo is left running or applied; the shared cluster is left alone."""
    assert "operator stopped" in run.output
    assert "emulator stopped" in run.output
    pid = re.search(r"operator ready \(pid (\d+)\)", run.output)
    if pid:
        assert not Path(f"/proc/{pid.group(1)}").exists(), "the operator process outlived the demo"
    with pytest.raises(ApiException) as missing:
        client.AdmissionregistrationV1Api(kube).read_mutating_webhook_configuration(
            f"mmo-demo-{run.namespace}"
        )
    assert missing.value.status == 404
    namespaces = client.CoreV1Api(kube).list_namespace(field_selector=f"metadata.name={run.namespace}").items
    assert all(ns.metadata.deletion_timestamp is not None for ns in namespaces), "namespace not deleted"
    # The session's cluster was joined, not started: the demo must not have stopped it.
    assert "left running" in run.output
    assert LocalCluster(cluster.state_dir).is_healthy()
    for log in ("operator.log", "emulator.log"):
        assert (run.work_dir / log).stat().st_size > 0
        assert f"log kept: {run.work_dir / log}" in run.output


def test_demo_tells_the_whole_story_and_cleans_up(
    cluster: ClusterInfo, kube: client.ApiClient, tmp_path: Path
) -> None:
    run = run_demo(cluster, tmp_path)
    assert run.returncode == 0, run.output
    out = run.output

    assert "reused" in run.step_text(1)
    assert "listening      http://127.0.0.1:" in run.step_text(2)
    assert "configmap/example-product-public-key serverside-applied" in run.step_text(3)
    assert "operator ready" in run.step_text(4)
    assert "Ready=True" in run.step_text(5)

    created = run.step_text(6)
    assert created.count(f"created with schedulingGates: [{GATE}]") == 3

    registered = run.step_text(7)
    assert registered.count("STS: token bound to this pod -> role/example-product") == 3
    assert registered.count("-> Granted: ungated") == 3
    assert "3/3 pods Granted and Running" in registered

    assert f"{GATE}: Granted 3/3" in run.step_text(8)

    verified = run.step_text(9)
    assert "VALID: productCode=1fszvu527waovqeuhpkyx2b5d publicKeyVersion=1 nonce=" in verified
    assert "(exit code 0)" in verified
    assert "INVALID: nonce claim" in verified
    assert "(exit code 1)" in verified

    assert "emulator clock -> " in run.step_text(10)

    scaled = run.step_text(11)
    assert scaled.count(f"created with schedulingGates: [{GATE}]") == 2
    assert scaled.count("-> Granted: ungated") == 2
    assert f"{GATE}: Granted 5/5" in scaled

    # 3 pods for half the hour, 5 for the other half (less the seconds before the first pods
    # were Ready): Average rounded Up is 4; vCPU is the Maximum, 5 x 250m.
    sent = run.step_text(12)
    assert re.search(r"replicas\s+quantity 4\s+Sent\s+record \S+", sent), sent
    assert re.search(r"vcpu\s+quantity 1\.25(0*)\s+Sent\s+record \S+", sent), sent
    assert f"allocation 4 to namespace={run.namespace}, team=storefront" in sent
    assert "the emulator holds exactly these 2 records" in sent

    table = run.step_text(13)
    header = r"NAME\s+PRODUCT\s+MODE\s+ENTITLED\s+DENIED\s+LAST METERED HOUR\s+READY\s+AGE"
    assert re.search(header, table), table
    row = r"example-product\s+1fszvu527waovqeuhpkyx2b5d\s+Enforce\s+5\s+0\s+\S+Z\s+True"
    assert re.search(row, table), table

    bill = run.step_text(14)
    billed = [int(s) for s in re.findall(r"^\s+pod example-product-\S+\s+(\d+) s x", bill, re.M)]
    assert len(billed) == 5, bill
    # The first three ran (almost) the whole hour, the two added at half past about half of it;
    # the seconds the demo itself takes between clock changes make the exact numbers vary.
    added, first = sorted(billed)[:2], sorted(billed)[2:]
    assert all(60 <= b <= 1900 for b in added), billed
    assert all(1900 < b <= 3700 for b in first), billed
    assert re.search(r"replicas\s+\S+Z\s+quantity 4\s", bill), bill
    assert re.search(r"total \$\d+\.\d{4}", bill)
    # Exactly one RegisterUsage per pod and one MeterUsage per dimension-hour, no failed call (the
    # DryRun permission check at the product's start is listed apart, and was permitted).
    calls = re.search(r"AWS calls seen: (.*)$", bill, re.M)
    assert calls, bill
    assert "RegisterUsage x5" in calls.group(1).split(", "), calls.group(1)
    assert "MeterUsage x2" in calls.group(1).split(", "), calls.group(1)
    assert re.search(r"(^|, )MeterUsage permission check x\d+(,|$)", calls.group(1)), calls.group(1)
    assert "(" not in calls.group(1), f"failed AWS calls: {calls.group(1)}"

    assert "Demo complete in" in out
    assert_cleaned_up(kube, cluster, run)


def test_an_unentitled_buyer_stops_the_demo_with_the_reason(
    cluster: ClusterInfo, kube: client.ApiClient, tmp_path: Path
) -> None:
    run = run_demo(cluster, tmp_path, "--unentitled")
    assert run.returncode == 1, run.output
    failure = run.output[run.output.index("DEMO FAILED") :]
    assert failure.startswith("DEMO FAILED at step 7/14")
    assert "is Denied" in failure
    assert "CustomerNotEntitledException" in failure
    assert "stays behind the scheduling gate" in failure
    assert "Demo complete" not in run.output
    assert_cleaned_up(kube, cluster, run)


def test_the_contract_story_shares_three_seats_and_hands_a_freed_one_on(
    cluster: ClusterInfo, kube: client.ApiClient, tmp_path: Path
) -> None:
    run = run_demo(cluster, tmp_path, "--contract", steps=11)
    assert run.returncode == 0, run.output

    emulator = run.step_text(2)
    assert "seats (Count) x 3, floating" in emulator
    # The emulator's roles allow exactly the chart's documented policy, read from the file.
    assert "(the pods): files/iam/license-manager.json" in emulator
    assert "license-manager:CheckoutLicense" in emulator
    assert "Ready=True" in run.step_text(5)

    web = run.step_text(6)
    assert web.count("STS: token bound to this pod -> role/example-contract") == 3
    assert web.count("CheckoutLicense seats x1 -> token") == 3
    assert "3/3 pods hold a seat and run" in web

    assert "contract seats: 3 in use of 3, 0 available" in run.step_text(7)

    waiting = run.step_text(8)
    assert f"created with schedulingGates: [{GATE}]" in waiting
    reason = re.search(r"reason: (.+)$", waiting, re.M)
    assert reason, waiting
    assert "waits for a seat" in waiting
    assert "still gated" in waiting

    handed_on = run.step_text(9)
    assert re.search(r"CheckInLicense \w{8}\.\. \(pod web-\S+\): seat returned", handed_on), handed_on
    assert handed_on.count("CheckoutLicense seats x1 -> token") == 1
    assert re.search(r"worker-\S+ Granted and Running", handed_on), handed_on
    assert "contract seats: 3 in use of 3" in handed_on

    extended = run.step_text(10)
    assert len(re.findall(r"\(pod \S+\): extended x1, expires", extended)) == 3, extended
    assert "contract seats: 3 in use of 3" in extended.split("past the first expiration:")[1]

    bill = run.step_text(11)
    assert "contract seats: 3 in use of 3, 0 available" in bill
    assert re.search(r"checkouts: .*Active x3", bill), bill
    assert re.search(r"checkouts: .*CheckedIn x1", bill), bill
    calls = re.search(r"AWS calls seen: (.*)$", bill, re.M)
    assert calls, bill
    seen = calls.group(1).split(", ")
    assert "CheckInLicense x1" in seen, seen
    # Four seats were granted (three web pods, then the worker); no RegisterUsage for a contract.
    assert "CheckoutLicense x4" in seen, seen
    assert "ExtendLicenseConsumption x3" in seen, seen
    assert not [c for c in seen if c.startswith("RegisterUsage")], seen
    # The documented policies sufficed: nothing was refused for a missing permission.
    assert not [c for c in seen if "AccessDenied" in c], seen

    assert "Demo complete in" in run.output
    assert_cleaned_up(kube, cluster, run)


def test_ctrl_c_stops_everything_it_started(
    cluster: ClusterInfo, kube: client.ApiClient, tmp_path: Path
) -> None:
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    work_dir = tmp_path / "demo"
    process = subprocess.Popen(
        demo_command(namespace, work_dir, cluster),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # A hung demo must fail this test, not hang the suite.
    watchdog = threading.Timer(RUN_TIMEOUT, process.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            # Operator, emulator and pods all up; the step waits for the operator's clock.
            if line.startswith("[10/14]"):
                process.send_signal(signal.SIGINT)
                break
        rest, _ = process.communicate(timeout=RUN_TIMEOUT)
        lines.append(rest)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    output = "".join(lines)
    assert process.returncode == 130, output
    assert "Interrupted (SIGINT)" in output
    assert "Demo complete" not in output
    assert_cleaned_up(kube, cluster, DemoRun(namespace, work_dir, process.returncode, output))
