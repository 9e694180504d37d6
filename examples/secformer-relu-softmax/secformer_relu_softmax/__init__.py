"""secformer-relu-softmax: an example plugin for secformer-compiler.

Importing this package (the compiler does it through the `secformer_compiler.passes` entry
point declared in pyproject.toml) registers:

* the approximation `softmax.2relu`, MPCFormer's 2ReLU softmax with a declared error bound
  against its own exact form (`approximation.py`);
* its 2PC protocol and static cost (`protocol.py`);
* the pass `report_softmax_count` (`passes.py`).

Then `secformer_compiler.compile(model, x, softmax="softmax.2relu")` uses it.
"""

from . import approximation, passes, protocol  # noqa: F401  (register on import)
from .approximation import EPS, NAME, SPEC, relu2_exact
from .protocol import softmax_2relu_cost

__all__ = ["EPS", "NAME", "SPEC", "relu2_exact", "softmax_2relu_cost"]
