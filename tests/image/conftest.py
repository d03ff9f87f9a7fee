"""The image tests use the chart tests' Helm CLI fixtures (the chart is what runs the image)."""

from tests.chart.conftest import cluster_helm, helm, helm_binary

__all__ = ["cluster_helm", "helm", "helm_binary"]
