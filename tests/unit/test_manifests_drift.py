"""The committed manifests are exactly what the models generate, and `--check` notices when not."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from metering_operator import cli
from metering_operator.commands import manifests
from metering_operator.domain.product import MeteredProduct

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "manifests"
GENERATED = (manifests.CRD_PATH, manifests.SAMPLE_PATH)


@pytest.mark.parametrize("relative", GENERATED)
def test_committed_manifest_equals_generated(tmp_path: Path, relative: str) -> None:
    assert cli.main(["manifests", "--output-dir", str(tmp_path)]) == 0
    fresh = (tmp_path / relative).read_bytes()
    committed = COMMITTED / relative
    assert committed.is_file(), f"{committed} is missing: run `make manifests`"
    assert committed.read_bytes() == fresh, (
        f"{committed} drifted from the models in metering_operator/domain/product.py: run `make manifests`"
    )


def test_check_passes_on_the_committed_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["manifests", "--check", "--output-dir", str(COMMITTED)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_check_names_drifted_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["manifests", "--output-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    crd_file = tmp_path / manifests.CRD_PATH
    crd_file.write_text(crd_file.read_text().replace("maxItems: 5", "maxItems: 6"))
    (tmp_path / manifests.SAMPLE_PATH).unlink()
    assert cli.main(["manifests", "--check", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"out of date: {crd_file}" in err
    assert f"out of date: {tmp_path / manifests.SAMPLE_PATH}" in err
    assert "make manifests" in err
    # Writing again repairs both.
    assert cli.main(["manifests", "--output-dir", str(tmp_path)]) == 0
    assert manifests.drifted(tmp_path) == []


def test_sample_file_is_the_sample_and_valid() -> None:
    loaded = yaml.safe_load((COMMITTED / manifests.SAMPLE_PATH).read_text())
    assert loaded == manifests.SAMPLE
    MeteredProduct.from_kube(loaded)
    text = (COMMITTED / manifests.SAMPLE_PATH).read_text()
    # Documented: field descriptions appear as comments above the fields.
    assert "# The AWS Marketplace product code of the listing." in text
    assert "# What is measured over the selected workloads and pods" in text


def test_invalid_sample_is_never_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = copy.deepcopy(manifests.SAMPLE)
    broken["spec"]["publicKeyVersion"] = 0
    monkeypatch.setattr(manifests, "SAMPLE", broken)
    with pytest.raises(ValueError, match="publicKeyVersion"):
        cli.main(["manifests", "--output-dir", str(tmp_path)])
    assert not (tmp_path / manifests.SAMPLE_PATH).exists()


def test_crd_file_is_one_crd_document() -> None:
    docs = list(yaml.safe_load_all((COMMITTED / manifests.CRD_PATH).read_text()))
    assert len(docs) == 1
    assert docs[0]["kind"] == "CustomResourceDefinition"
    assert docs[0]["metadata"]["name"] == "meteredproducts.marketplace.metering.dev"
