"""Approximations of Transformer nonlinearities as data: specs, float references, calibration.

Importing this package registers every spec in `APPROXIMATIONS` (one module per op
family). See `spec.py` for `ApproxSpec`, `measure.py` for how declared bounds are
checked, and `goldschmidt.py` for pre-scale/iteration calibration.
"""

from . import gelu, goldschmidt, iterative, layernorm, softmax, tanh  # noqa: F401  (fill the registry)
from .gelu import (
    ERF_SINE_COEFFS,
    ERF_SINE_PERIOD,
    ERF_SINE_THRESHOLD,
    GELU_EVEN_COEFFS,
    GELU_EVEN_CONST,
    fit_erf_sine_series,
    fit_gelu_even_cos_series,
)
from .goldschmidt import (
    CALIBRATION_TARGET_REL_ERR,
    DEFAULT_TARGET_REL_ERR,
    GOLDSCHMIDT_DEFAULTS,
    GoldschmidtChoice,
    GoldschmidtDefault,
    calibrate_goldschmidt,
    choose_goldschmidt,
    choose_seeded_goldschmidt,
)
from .measure import ErrorReport, measure_error, target_of
from .spec import (
    APPROXIMATIONS,
    OPS,
    ApproxSpec,
    DuplicateApproximationError,
    UnknownApproximationError,
    approximation,
    approximations_for,
    get_approx,
    register,
)

__all__ = [
    "APPROXIMATIONS",
    "CALIBRATION_TARGET_REL_ERR",
    "DEFAULT_TARGET_REL_ERR",
    "ERF_SINE_COEFFS",
    "ERF_SINE_PERIOD",
    "ERF_SINE_THRESHOLD",
    "GELU_EVEN_COEFFS",
    "GELU_EVEN_CONST",
    "GOLDSCHMIDT_DEFAULTS",
    "OPS",
    "ApproxSpec",
    "DuplicateApproximationError",
    "ErrorReport",
    "GoldschmidtChoice",
    "GoldschmidtDefault",
    "UnknownApproximationError",
    "approximation",
    "approximations_for",
    "calibrate_goldschmidt",
    "choose_goldschmidt",
    "choose_seeded_goldschmidt",
    "fit_erf_sine_series",
    "fit_gelu_even_cos_series",
    "get_approx",
    "measure_error",
    "register",
    "target_of",
]
