"""Public entry point for the approximation catalog (implemented in `secformer_compiler.approx`).

`from secformer_compiler.approximations import get_approx` works the same as importing
from the package; the package is split by op family to keep modules short.
"""

from .approx import *  # noqa: F401,F403
from .approx import __all__  # noqa: F401
