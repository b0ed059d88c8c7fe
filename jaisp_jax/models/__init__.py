"""Flax model modules of JAISP: stems, information map, ViT trunk, heads, variants.

Entry points: `JAISP` (all variants), `default_model_config`, `get_representation`.
"""

from jaisp_jax.models.jaisp import (  # noqa: F401
    JAISP, VARIANTS, count_params, default_model_config, get_representation, pair_layout,
    sample_hidden_bands)
