"""Build the container image from the Dockerfile without a Docker engine: `python -m devtools.image`.

`make image` runs this. It uses Debian's `buildah` (no daemon) and works with no image registry:

1. The base image (the Dockerfile's ``PYTHON_IMAGE`` build argument). ``PYTHON_IMAGE`` from the
   environment is used as is (e.g. ``python:3.11-slim`` where a registry is reachable). Otherwise
   the image ``localhost/mmo-python:3.11-bookworm`` is made from Debian 12 packages (python3,
   python3-venv, python-is-python3, ca-certificates; documentation stripped) with ``mmdebstrap``.
   Its root filesystem tarball is cached under ``~/.cache/marketplace-metering-operator/images/``
   (keyed by the recipe) and the image stays in the machine's container storage, so only the
   first run on a machine pays for it.
2. A wheelhouse of the dependencies, made on the host with the host's own pip (and its
   configuration), is bind-mounted into the build (``PIP_FIND_LINKS``/``PIP_NO_INDEX`` build
   arguments): the build container needs no package index.
3. ``buildah bud --layers`` builds the Dockerfile as is; the image's size is printed.

Its last stdout line is the image reference. ``podman`` runs the result (see tests/image).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "marketplace-metering-operator"
IMAGE_NAME = "localhost/marketplace-metering-operator"
BASE_IMAGE_NAME = "localhost/mmo-python"
BASE_SUITE = "bookworm"  # Debian 12: Python 3.11, the version the project supports
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
# Nothing reads documentation in a container; dpkg skips these paths on unpack.
BASE_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/merged-usr")
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")


def _log(msg: str) -> None:
    print(f"[image {time.strftime('%H:%M:%S', time.gmtime())}] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    base = os.environ.get("MMO_CACHE_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "marketplace-metering-operator"
    )
    return Path(base) / "images"


def version() -> str:
    """The project's one version (pyproject.toml, as installed metadata reports it)."""
    from metering_operator import __version__

    return __version__


def image_ref() -> str:
    return f"{IMAGE_NAME}:{version()}"


def runtime() -> str:
    """podman's OCI runtime: Debian's runc (crun refuses these machines' hybrid cgroup layout)."""
    found = shutil.which("runc") or ("/usr/sbin/runc" if Path("/usr/sbin/runc").exists() else None)
    if not found:
        raise SystemExit("runc is not installed (apt-get install runc)")
    return found


def _run(cmd: list[str], *, quiet: bool = False) -> str:
    """Run ``cmd``; its stdout, or (``quiet``) nothing; progress and errors go to stderr."""
    done = subprocess.run(cmd, check=True, text=True, stdout=subprocess.DEVNULL if quiet else subprocess.PIPE)
    return done.stdout or ""


def _image_exists(ref: str) -> bool:
    done = subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True, check=False)
    return done.returncode == 0


def _base_key() -> str:
    recipe = "\n".join([BASE_SUITE, *BASE_PACKAGES, *BASE_EXCLUDES, str(MERGED_USR_HOOK)])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def base_image() -> str:
    """The base image reference, made from Debian packages (and cached) unless PYTHON_IMAGE is set."""
    given = os.environ.get("PYTHON_IMAGE")
    if given:
        return given
    key = _base_key()
    ref = f"{BASE_IMAGE_NAME}:3.11-{BASE_SUITE}-{key}"
    if _image_exists(ref):
        _log(f"base image {ref}: in container storage")
        return ref
    tarball = cache_dir() / f"python-3.11-{BASE_SUITE}-{key}.tar"
    if not tarball.exists():
        tool = shutil.which("mmdebstrap")
        if not tool:
            raise SystemExit("mmdebstrap is not installed (apt-get install mmdebstrap)")
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")
        cmd = [tool, "--variant=essential", f"--include={','.join(BASE_PACKAGES)}"]
        # Merge /usr in a hook, so the `usrmerge` package (and the perl it needs, 55 MB) stays out.
        cmd += [f"--hook-dir={MERGED_USR_HOOK}"]
        cmd += [f"--dpkgopt=path-exclude={path}" for path in BASE_EXCLUDES]
        # The machine's own Debian sources (its mirror), else mmdebstrap's default.
        cmd += [BASE_SUITE, str(partial)] + ([str(APT_SOURCES)] if APT_SOURCES.exists() else [])
        _log(f"making the base image from Debian packages: {' '.join(cmd)}")
        _run(cmd, quiet=True)
        partial.rename(tarball)
        # Tarballs of older recipes are never used again.
        for stale in tarball.parent.glob(f"python-3.11-{BASE_SUITE}-*.tar"):
            if stale != tarball:
                stale.unlink()
    _log(f"importing {tarball} as {ref}")
    container = _run(["buildah", "from", "scratch"]).strip()
    try:
        _run(["buildah", "add", "--quiet", container, str(tarball), "/"], quiet=True)
        _run(["buildah", "config", "--env", "LANG=C.UTF-8", "--cmd", '["python3"]', container])
        _run(["buildah", "commit", "--quiet", container, ref], quiet=True)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
    return ref


def wheelhouse(target: Path) -> Path:
    """The runtime dependencies (and the wheel build's own) as wheels, downloaded on the host."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    # The project's runtime requirements as installed (make venv reinstalls on a pyproject.toml
    # change), and what building its wheel needs; the project itself is built by the Dockerfile.
    requirements = [r for r in metadata.requires(DISTRIBUTION) or [] if "extra ==" not in r]
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(target)]
    _run([*pip, *requirements, "setuptools>=77", "wheel", "pip"], quiet=True)
    return target


def image_size(ref: str) -> int:
    return int(_run(["podman", "image", "inspect", "--format", "{{.Size}}", ref]).strip())


def build(tag: str | None = None) -> str:
    for tool in ("buildah", "podman"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (apt-get install buildah podman runc mmdebstrap)")
    started = time.monotonic()
    base = base_image()
    ref = tag or image_ref()
    with tempfile.TemporaryDirectory(prefix="mmo-wheelhouse-") as tmp:
        wheels = wheelhouse(Path(tmp) / "wheelhouse")
        _log(f"building {ref} from {REPO_ROOT / 'Dockerfile'} on {base}")
        subprocess.run(
            [
                "buildah",
                "bud",
                "--layers",
                "--network",
                "host",
                "--build-arg",
                f"PYTHON_IMAGE={base}",
                "--build-arg",
                "PIP_FIND_LINKS=/wheelhouse",
                "--build-arg",
                "PIP_NO_INDEX=1",
                "--volume",
                f"{wheels}:/wheelhouse:ro",
                "--tag",
                ref,
                "--file",
                str(REPO_ROOT / "Dockerfile"),
                str(REPO_ROOT),
            ],
            check=True,
            stdout=sys.stderr,  # the build's progress; stdout's last line is the image reference
        )
    size = image_size(ref)
    _log(f"built {ref}: {size / 1e6:.1f} MB in {time.monotonic() - started:.0f}s")
    return ref


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.image", description=__doc__.splitlines()[0])
    parser.add_argument("--tag", help=f"image reference (default {IMAGE_NAME}:<version>)")
    args = parser.parse_args(argv)
    print(build(args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
