"""whybn's instruments: probes that measure a ``torch.nn.Module`` and a loss, with no side effects.

Every probe is ``probe(model, loss_fn, batches, *, options) -> frozen dataclass`` with ``to_records()``
(see DESIGN.md); ``bn="batch"`` measures the loss the optimizer trains, ``bn="running"`` the inference
network, and the model, its buffers, flags, gradients and the RNG state are left exactly as found.
"""

from probes.conditioning import (
    covariance_spectrum,
    kfac_factor_conditioning,
    layer_input_conditioning,
    least_squares_conditioning,
    normalization_disturbance,
    rank_collapse,
)
from probes.gradients import (
    effective_learning_rates,
    layer_gradient_norms,
    scale_invariance,
    update_to_weight_ratios,
)
from probes.hessian import (
    hessian_density,
    hessian_eigenvalues,
    hessian_operator,
    hessian_outliers,
    hessian_trace,
)
from probes.ics import distribution_shift, ics_gradient_change, layer_input_statistics
from probes.smoothness import landscape_along_gradient

__all__ = [
    "covariance_spectrum",
    "distribution_shift",
    "effective_learning_rates",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_operator",
    "hessian_outliers",
    "hessian_trace",
    "ics_gradient_change",
    "kfac_factor_conditioning",
    "landscape_along_gradient",
    "layer_gradient_norms",
    "layer_input_conditioning",
    "layer_input_statistics",
    "least_squares_conditioning",
    "normalization_disturbance",
    "rank_collapse",
    "scale_invariance",
    "update_to_weight_ratios",
]
