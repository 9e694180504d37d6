"""secformer-compiler: compile Transformers for private two-party inference, SecFormer-style."""

from .compiled import CompiledModel, compile  # noqa: F401
from .errors import CompileError  # noqa: F401

__version__ = "0.3.0"
