"""The facts every benchmark report starts with: which machine, how many CPUs, which Python."""

from __future__ import annotations

import os
import platform
import subprocess
import sys


def machine_facts() -> dict[str, str]:
    """``machine`` (host, architecture, CPUs), ``nproc`` (the CPUs this process may use) and
    ``python`` (version), as the reports print them."""
    return {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip(),
        "python": sys.version.split()[0],
    }
