"""Errors the compiler raises: templated, with context (op, module path, node), all at once.

A `CompileError` carries the list of problems it found (`items`), so one run of a check
reports every unsupported op or every bad node instead of stopping at the first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong: what (`what`), where in the model (`module_path`), which node."""

    what: str
    module_path: str = ""
    node: str = ""

    def __str__(self) -> str:
        where = self.module_path or "<top level>"
        at = f" (node %{self.node})" if self.node else ""
        return f"{self.what} at {where}{at}"


class CompileError(Exception):
    """The model cannot be compiled; `items` lists every problem found."""

    def __init__(self, message: str, items: list[Problem] | None = None, hint: str = ""):
        self.message = message
        self.items = list(items or [])
        self.hint = hint
        lines = [message]
        lines += [f"  - {p}" for p in self.items]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class UnsupportedOpsError(CompileError):
    """Ops on secret values that have no MPC lowering (see `passes.support`)."""


class VerifyError(CompileError):
    """The IR is malformed; `pass_name` names the pass that produced it, if known."""

    def __init__(self, message: str, items: list[Problem] | None = None, pass_name: str = ""):
        self.pass_name = pass_name
        prefix = f"IR verification failed after pass '{pass_name}': " if pass_name else ""
        super().__init__(prefix + message, items)
        self.message = message
