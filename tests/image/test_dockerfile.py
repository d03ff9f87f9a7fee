"""The image recipe, read without building it (fast; no buildah needed).

The Dockerfile is parsed and checked against the image rules: multi-stage, the base image a build
argument, a wheel installed into a virtualenv, a numeric non-root user the chart runs as, an
exec-form entrypoint running `metering-operator run`, a build context that carries what is copied
and nothing secret, and the image's version label equal to the package version. The image itself
is built with buildah and run with podman in tests/image/test_container.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from metering_operator import __version__
from tests.image import dockerfile

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


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
    copies = [c.value.split() for c in final.all("COPY")]
    assert copies == [["--from=build", "/wheels", "/wheels"]], "the final stage gets only the wheel"
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
            if copy.value.startswith("--from="):
                continue  # from another stage, not from the build context
            sources, _ = dockerfile.copy_sources(copy.value)
            for source in sources:
                assert dockerfile.dockerignore_allows(patterns, source), (
                    f".dockerignore excludes {source}, which line {copy.line} copies"
                )
    # and leaves out what must never reach an image
    for secretish in (".venv/bin/python", ".git/config", "tests/conftest.py", ".local/kubeconfig"):
        assert not dockerfile.dockerignore_allows(patterns, secretish)
    assert not dockerfile.dockerignore_allows(patterns, "operator/metering_operator/__pycache__/x.pyc")


def test_image_label_carries_the_package_version(parsed: dockerfile.Dockerfile) -> None:
    labels = " ".join(label.value for label in parsed.stages[-1].all("LABEL"))
    assert f'org.opencontainers.image.version="{__version__}"' in labels, labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels, labels


def test_build_needs_no_pip_in_the_base_image(parsed: dockerfile.Dockerfile) -> None:
    """Debian's python3 has no pip module: every stage gets pip from a virtualenv of its own."""
    for stage in parsed.stages:
        for run in stage.all("RUN"):
            command = dockerfile.parse_run(run.value).command
            assert "python -m pip" not in command, f"line {run.line}: the base image may have no pip"
            assert command.startswith("python -m venv "), f"line {run.line}: {command[:80]}"
