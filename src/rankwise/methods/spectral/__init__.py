"""The spectral family (methods.md#spectral-gates): Spectral Adapter, BHSP, CBSP and TABS.

Modules: ``svd_cache`` (frozen top-R factors), ``gates`` (HardConcrete), ``controllers``
(gate sources), ``budget_projection`` (B_max and the top-logit projection), ``context``
(attention mask for the layers), ``layer`` (SpectralLinear, dense and sparse paths), ``flops``,
``statistics`` (evaluation gate statistics), ``config`` and ``method``.
"""

from rankwise.methods.spectral.config import (
    BHSPConfig,
    CBSPConfig,
    SpectralAdapterConfig,
    SpectralRecipe,
    TABSConfig,
)
from rankwise.methods.spectral.layer import SpectralLinear
from rankwise.methods.spectral.method import (
    BHSP,
    CBSP,
    TABS,
    SpectralAdapter,
    SpectralFamily,
    record_gate_statistics,
    spectral_layers,
)

__all__ = [
    "BHSP",
    "BHSPConfig",
    "CBSP",
    "CBSPConfig",
    "SpectralAdapter",
    "SpectralAdapterConfig",
    "SpectralFamily",
    "SpectralLinear",
    "SpectralRecipe",
    "TABS",
    "TABSConfig",
    "record_gate_statistics",
    "spectral_layers",
]
