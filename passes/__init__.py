"""Compiler passes: named functions graph -> graph, registered with `@register_pass`.

The default pipeline, from an imported `aten`-level graph to the approximated MPC IR:

1. `analyze_secrecy`: const / public / weight / secret class of every value;
2. `check_support`: one error listing every secret op without a lowering (before converting);
3. `fold_public`: constants and weight-only values evaluated at compile time, public
   values (the padding mask) as `public_fn` nodes run in the clear;
4. `decompose_aten`: ATen ops -> IR ops (sdpa, addmm, conv2d patches, views, ...);
5. `recognize_gelu`, `recognize_layernorm`, `recognize_softmax_mask`: written-out forms ->
   one op each, masks -> softmax's multiplicative 0/1 mask;
6. `lower_to_mpc`: remaining public selections -> arithmetic; only MPC ops remain;
7. `approximate`: each nonlinearity's method and parameters from the preset;
   `bound_gelu_inputs`: each SecFormer GeLU's comparison range from the LayerNorm and linear
   layer before it (fewer bits, and fewer rounds below ~28);
8. `fuse_sibling_linears`: linear layers reading the same secret input (attention's query,
   key and value) become one, so their input is opened once.

Not in the default pipeline (compile(fewer_rounds=True) runs them): `fold_layernorm_affine`
moves each LayerNorm's gain and shift into the linear layers after it, and
`commute_layernorm_scaling` marks LayerNorms to compute those layers, one round sooner for
more bytes.

The `PassManager` verifies the graph after every pass and names the pass that broke it.
"""

from . import approximate, bounds, decompose, fuse, lower, patterns, rounds, secrecy, support  # noqa: F401  (register passes)
from .registry import (
    ENTRY_POINT_GROUP,
    PASSES,
    DuplicatePassError,
    PassManager,
    get_pass,
    load_plugins,
    register_pass,
    run_passes,
)

DEFAULT_PIPELINE: tuple[str, ...] = (
    "analyze_secrecy",
    "check_support",
    "fold_public",
    "decompose_aten",
    "recognize_gelu",
    "recognize_layernorm",
    "recognize_softmax_mask",
    "lower_to_mpc",
    "approximate",
    "bound_gelu_inputs",
    "fuse_sibling_linears",
)

__all__ = [
    "DEFAULT_PIPELINE",
    "ENTRY_POINT_GROUP",
    "PASSES",
    "DuplicatePassError",
    "PassManager",
    "get_pass",
    "load_plugins",
    "register_pass",
    "run_passes",
]
