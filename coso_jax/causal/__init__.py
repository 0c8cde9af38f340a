"""CoSo's causal machinery: counterfactual token effects, causal weights, the action-type
classifier, the skip-token mask and the token heatmap."""
from coso_jax.causal.effects import (
                                     bucket_length,
                                     bucket_lengths,
                                     causal_weights,
                                     counterfactual_effects,
                                     precompile,
                                     trace_count,
)
from coso_jax.causal.skip import SKIP_STRINGS, skip_token_mask

__all__ = [
    "counterfactual_effects",
    "causal_weights",
    "bucket_length",
    "bucket_lengths",
    "precompile",
    "trace_count",
    "skip_token_mask",
    "SKIP_STRINGS",
]
