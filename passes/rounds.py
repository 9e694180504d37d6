"""`commute_layernorm_scaling`: trade bytes for rounds at each SecFormer LayerNorm.

Why: a LayerNorm's output is Z r + beta with r = 1/sigma per row, and r comes last (the
Goldschmidt rsqrt takes most of the LayerNorm's rounds). The linear layer after it can run
on Z instead, beside the rsqrt, with r applied after its product, since a row scaling
commutes with a product on the right: LN(x) W = r (Z W) + beta W
(runtime/protocols/nonlinear.py, `layernorm_goldschmidt(commute=...)`). The linear's
output is then ready with the LayerNorm's own, one round sooner: two rounds per
Transformer layer (FFN1 and the next layer's query/key/value), BERT-base at seq 128:
335 rounds instead of 358.

The price is bytes and CPU: r (Z W) opens Z W, the linear's output width (2304 for the
fused Q/K/V, 3072 for FFN1), where the linear would open LN(x) (768): 357 MiB per party
instead of 296, and about 0.6 s more per BERT-base inference on 2 cores. Each saved round
is worth RTT, each extra byte 8 / bandwidth, so it pays off only where RTT x bandwidth
exceeds about 22 Mbit (61 MiB / 23 rounds): e.g. 40 ms at 1 Gbit/s, not a LAN (0.5 ms at
1 Gbit/s) or a 100 Mbit/s WAN. Hence a compile option (`compile(fewer_rounds=True)`,
`secformer compile --fewer-rounds`), not a default.

This pass only marks the LayerNorms (attribute commute = 1, kept in artifacts); where the
rewrite applies is decided with the other deferrals (secformer_compiler/deferral.py): a
`layernorm.secformer` over the last dim whose output is left raw for the linear layers
after it, with 3 or more rsqrt iterations.
"""

from __future__ import annotations

from ..ir import Graph
from .registry import register_pass


@register_pass("commute_layernorm_scaling")
def commute_layernorm_scaling(graph: Graph) -> Graph:
    """Mark every SecFormer LayerNorm to compute the linear layers after it (fewer rounds,
    more bytes: see the module docstring)."""
    for n in graph:
        if n.op == "layernorm" and n.attrs.get("method") == "layernorm.secformer":
            n.attrs["commute"] = 1
    return graph
