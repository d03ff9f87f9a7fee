"""The container image, tested without Docker (these machines have none).

The Dockerfile is parsed, checked against the image rules (multi-stage, base image as a build
argument, wheel install, numeric non-root user, exec-form entrypoint running `metering-operator run`),
and its RUN steps are replayed here as written, with the image's paths mapped into a temporary
directory: the wheel is built from the same COPY'd files, installed into a clean virtualenv the
same way, and the console script must work from there. What Docker adds on top (the base image's
filesystem, layers) is the only part left untested.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chart import dockerfile

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
# The base image's interpreter stands in for `python` in RUN steps: a plain CPython without the
# project's virtualenv, so nothing leaks from the development install.
BASE_PYTHON = Path(getattr(sys, "_base_executable", sys.executable))


@pytest.fixture(scope="module")
def parsed() -> dockerfile.Dockerfile:
    return dockerfile.parse(DOCKERFILE)


def test_base_image_is_a_build_argument_used_by_every_stage(parsed: dockerfile.Dockerfile) -> None:
    assert parsed.args.get("PYTHON_IMAGE") == "python:3.11-slim"
    assert len(parsed.stages) >= 2, "the Dockerfile must be multi-stage"
    assert [s.base for s in parsed.stages] == ["${PYTHON_IMAGE}"] * len(parsed.stages)


def test_final_stage_installs_a_wheel_and_runs_as_numeric_non_root(parsed: dockerfile.Dockerfile) -> None:
    build, final = parsed.stages[0], parsed.stages[-1]
    assert any("pip wheel" in r.value for r in build.all("RUN")), "first stage must build a wheel"
    runs = [dockerfile.parse_run(r.value) for r in final.all("RUN")]
    assert any(".whl" in r.command and "install" in r.command for r in runs)
    assert not final.all("COPY"), "the final stage gets only the wheel (bind mount), no sources"
    users = final.all("USER")
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].value.partition(":")
    assert uid.isdigit(), f"USER must be a numeric non-root uid, got {users[-1].value!r}"
    assert int(uid) != 0, f"USER must be a numeric non-root uid, got {users[-1].value!r}"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_entrypoint_is_exec_form_metering_operator_run(parsed: dockerfile.Dockerfile) -> None:
    final = parsed.stages[-1]
    entrypoint = dockerfile.exec_form(final.all("ENTRYPOINT")[-1].value)
    cmd = dockerfile.exec_form(final.all("CMD")[-1].value)
    assert entrypoint == ["metering-operator"], "ENTRYPOINT must be the exec form, no shell"
    assert cmd == ["run"]


def test_chart_runs_the_image_as_the_dockerfile_user(parsed: dockerfile.Dockerfile) -> None:
    import yaml

    values = yaml.safe_load((REPO / "charts/marketplace-metering-operator/values.yaml").read_text())
    uid, _, gid = parsed.stages[-1].all("USER")[-1].value.partition(":")
    assert values["securityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid or uid)


def test_build_context_keeps_every_copied_file(parsed: dockerfile.Dockerfile) -> None:
    patterns = dockerfile.read_dockerignore(REPO / ".dockerignore")
    for stage in parsed.stages:
        for copy in stage.all("COPY"):
            sources, _ = dockerfile.copy_sources(copy.value)
            for source in sources:
                assert dockerfile.dockerignore_allows(patterns, source), (
                    f".dockerignore excludes {source}, which line {copy.line} copies"
                )
    # and leaves out what must never reach an image
    for secretish in (".venv/bin/python", ".git/config", "tests/conftest.py", ".local/kubeconfig"):
        assert not dockerfile.dockerignore_allows(patterns, secretish)
    assert not dockerfile.dockerignore_allows(patterns, "operator/metering_operator/__pycache__/x.pyc")


def _replay_stage(stage: dockerfile.Stage, paths: dict[str, Path], env: dict[str, str]) -> None:
    """Run one stage's COPY/WORKDIR/ENV/RUN steps with the image's absolute paths mapped to `paths`."""

    def mapped(text: str) -> str:
        # Longest first so /opt/venv is not mistaken for a prefix of something shorter.
        for image_path in sorted(paths, key=len, reverse=True):
            text = re.sub(rf"(?<![\w/]){re.escape(image_path)}(?![\w-])", str(paths[image_path]), text)
        return text

    workdir = paths["/"]
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = Path(mapped(str(instruction.value)))
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "ENV":
            for key, value in dockerfile.parse_env(instruction.value).items():
                env[key] = mapped(value).replace("$PATH", env["PATH"])
        elif instruction.keyword == "COPY":
            sources, destination = dockerfile.copy_sources(instruction.value)
            target = workdir / destination
            for source in sources:
                origin = REPO / source
                assert origin.exists(), (
                    f"Dockerfile line {instruction.line} copies {source}, which is missing"
                )
                if origin.is_dir():
                    shutil.copytree(
                        origin, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target / origin.name)
        elif instruction.keyword == "RUN":
            step = dockerfile.parse_run(instruction.value)
            for mount_target in step.bind_mounts:
                assert mount_target in paths, f"bind mount target {mount_target} has no mapping"
            command = mapped(step.command)
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert result.returncode == 0, (
                f"Dockerfile line {instruction.line} failed:\n$ {command}\n{result.stdout}\n{result.stderr}"
            )


def test_dockerfile_steps_build_and_install_a_working_wheel(
    parsed: dockerfile.Dockerfile, tmp_path: Path
) -> None:
    # `python` in the RUN steps is the base image's interpreter.
    shim = tmp_path / "base-bin"
    shim.mkdir()
    (shim / "python").symlink_to(BASE_PYTHON)
    base_env = {
        "PATH": f"{shim}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
    }
    # Use the machine's pip configuration (index mirror, cache) like a docker build would use the
    # builder's network, but nothing else from the developer's environment.
    for key in (
        "PIP_INDEX_URL",
        "PIP_EXTRA_INDEX_URL",
        "PIP_TRUSTED_HOST",
        "PIP_CONFIG_FILE",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "XDG_CONFIG_HOME",
    ):
        if key in os.environ:
            base_env[key] = os.environ[key]
    if (Path.home() / ".config/pip").exists() or (Path.home() / ".pip").exists():
        base_env["HOME"] = str(Path.home())

    build, final = parsed.stages[0], parsed.stages[-1]
    paths = {"/": tmp_path / "root", "/src": tmp_path / "src", "/wheels": tmp_path / "wheels"}
    paths["/"].mkdir()
    _replay_stage(build, paths, dict(base_env))
    wheels = list((tmp_path / "wheels").glob("*.whl"))
    assert len(wheels) == 1, f"expected exactly one wheel (--no-deps), found {wheels}"
    assert wheels[0].name.startswith("marketplace_metering_operator-")

    paths = {"/": tmp_path / "root", "/wheels": tmp_path / "wheels", "/opt/venv": tmp_path / "venv"}
    final_env = dict(base_env)
    _replay_stage(final, paths, final_env)

    venv = tmp_path / "venv"
    assert not (venv / "bin/pip").exists(), "the final virtualenv should carry no pip"
    script = shutil.which("metering-operator", path=final_env["PATH"])
    assert script == str(venv / "bin/metering-operator"), "the console script must come from the new venv"

    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import metering_operator; print(metering_operator.__file__)"],
        capture_output=True,
        text=True,
        env=final_env,
        check=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert where.startswith(str(venv)), f"imported from {where}, not from the installed wheel"

    help_text = subprocess.run(
        [script, "--help"], capture_output=True, text=True, env=final_env, check=True, cwd=tmp_path
    ).stdout
    for subcommand in ("run", "emulator", "verify"):
        assert re.search(rf"\b{subcommand}\b", help_text), f"`{subcommand}` missing from --help"
    # The image's default command is `run`: it must at least parse its flags from the wheel install.
    run_help = subprocess.run(
        [script, "run", "--help"], capture_output=True, text=True, env=final_env, cwd=tmp_path
    )
    assert run_help.returncode == 0, run_help.stderr
    for flag in ("--namespace", "--trusted-product-code", "--region", "--webhook-cert-dir", "--health-port"):
        assert flag in run_help.stdout, f"`run --help` of the installed wheel lacks {flag}"
    # botocore was pruned to two service models: both clients, and the emulator's use of the
    # Metering model, still load.
    subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import boto3; from metering_operator.emulator.validation import service_model; "
            "[boto3.client(s, region_name='eu-west-1') for s in ('meteringmarketplace', 'sts')]; "
            "[service_model(s).operation_names for s in ('meteringmarketplace', 'sts')]",
        ],
        check=True,
        env=final_env,
        cwd=tmp_path,
        capture_output=True,
    )
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file())
    print(f"installed virtualenv: {size / 2**20:.1f} MiB")  # reported, not asserted
