"""The chart installs the very CRD `largemodel crd` generates (crds/ at the repository root)."""

from __future__ import annotations

from tests.support.chartrender import CHART_DIR, chart_crds
from tests.support.paths import REPO

REPO_CRD = REPO / "crds" / "serving.largemodel.io_largemodels.yaml"
CHART_CRD = CHART_DIR / "crds" / REPO_CRD.name


def test_chart_crd_is_byte_identical_to_the_generated_one() -> None:
    assert CHART_CRD.read_bytes() == REPO_CRD.read_bytes(), (
        f"the chart's CRD is stale: cp {REPO_CRD.relative_to(REPO)} {CHART_CRD.relative_to(REPO)}"
    )


def test_helm_sees_exactly_one_crd_the_largemodel_one() -> None:
    (crd,) = chart_crds()
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "largemodels.serving.largemodel.io"
    assert crd["spec"]["names"]["shortNames"] == ["lm"]
