"""kgpu: GPU manager for KubeEdge edge fleets. This package holds only the CLI entry point;
the product lives in the top-level packages `edge`, `cloud` and `shared`."""

from shared import __version__

__all__ = ["__version__"]
