"""The pass registry and the pass manager.

A pass is a function `graph -> graph` (it may edit the graph in place and return it, or
return a new one) with a one-line docstring, registered by name with `@register_pass`.
Options reach a pass as keyword arguments (`PassManager(..., options={"approximate":
{"preset": "puma"}})`). Installed packages add passes through the entry-point group
`secformer_compiler.passes`: each entry point names a module or function whose import
registers passes; they are loaded the first time an unknown pass name is asked for.
The manager verifies the graph after every pass and names the pass that broke it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import CompileError, VerifyError
from ..ir import Graph

ENTRY_POINT_GROUP = "secformer_compiler.passes"

Pass = Callable[..., Graph]
PASSES: dict[str, Pass] = {}
_plugins_loaded = False


class DuplicatePassError(ValueError):
    """A pass name registered twice."""


def register_pass(name: str) -> Callable[[Pass], Pass]:
    """Decorator: register a documented pass under `name`; a name taken twice is an error."""

    def decorate(fn: Pass) -> Pass:
        if name in PASSES:
            raise DuplicatePassError(f"pass {name!r} is already registered by "
                                     f"{PASSES[name].__module__}.{PASSES[name].__qualname__}")
        if not (fn.__doc__ or "").strip():
            raise ValueError(f"pass {name!r} needs a docstring saying what it does")
        fn.pass_name = name  # type: ignore[attr-defined]
        PASSES[name] = fn
        return fn

    return decorate


def load_plugins() -> list[str]:
    """Import every entry point of `secformer_compiler.passes`; returns their names."""
    global _plugins_loaded
    names = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except DuplicatePassError:
            raise
        except Exception as e:  # noqa: BLE001 - name the plugin that failed
            raise CompileError(f"pass plugin {ep.name!r} ({ep.value}) failed to load: {e}") from e
        names.append(ep.name)
    _plugins_loaded = True
    return names


def get_pass(name: str) -> Pass:
    """The pass registered as `name`, loading plugins on first miss."""
    if name not in PASSES and not _plugins_loaded:
        load_plugins()
    if name not in PASSES:
        raise CompileError(f"no pass named {name!r}; registered: {', '.join(sorted(PASSES))}")
    return PASSES[name]


@dataclass
class PassManager:
    """Run passes in order, verifying after each; `history` records (pass, node count)."""

    passes: Sequence[str | Pass]
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    verify: bool = True
    history: list[tuple[str, int]] = field(default_factory=list)

    def run(self, graph: Graph) -> Graph:
        for p in self.passes:
            fn = get_pass(p) if isinstance(p, str) else p
            name = getattr(fn, "pass_name", getattr(fn, "__name__", str(fn)))
            opts = dict(self.options.get(name, {}))
            accepted = inspect.signature(fn).parameters
            if not any(a.kind == a.VAR_KEYWORD for a in accepted.values()):
                opts = {k: v for k, v in opts.items() if k in accepted}
            try:
                out = fn(graph, **opts)
            except CompileError:
                raise
            except Exception as e:
                e.add_note(f"while running pass '{name}'")
                raise
            graph = graph if out is None else out
            if self.verify:
                try:
                    graph.verify()
                except VerifyError as e:
                    raise VerifyError(e.message, e.items, pass_name=name) from None
            self.history.append((name, len(graph)))
        return graph


def run_passes(graph: Graph, passes: Sequence[str | Pass], **options: Mapping[str, Any]) -> Graph:
    """Shorthand: `PassManager(passes, options).run(graph)`."""
    return PassManager(passes, options).run(graph)
