"""The modeling file written next to exported weights: `modeling_routed.py`, plus the FFN of
a router plug-in (`RouterSpec.export_code`, docs/routing.md#exported-ffn).

A plug-in's FFN class and its helpers are appended as source, so the export stays one
file that imports only torch and transformers: the appended code runs in the namespace
of modeling_routed.py and may use any name defined at its top level. Whatever else it
would need (an import, a constant of the plug-in's module) is refused here, at export,
rather than when someone loads the model.
"""
from __future__ import annotations

import builtins
import inspect
import symtable
import textwrap
from pathlib import Path
from typing import Callable, Iterator, Optional

from llm.routing.registry import ExportCode, ExportError

MODELING_FILE = Path(__file__).with_name("modeling_routed.py")


def modeling_source(router: str, code: Optional[ExportCode]) -> str:
    """The text of modeling_routed.py for a model routed by `router`."""
    template = MODELING_FILE.read_text()
    if code is None:
        return template
    objects = (*code.helpers, code.ffn)
    taken = top_level_names(template) & {getattr(obj, "__name__", "") for obj in objects}
    if taken:
        raise ExportError(f"router {router!r}: export_code defines {', '.join(sorted(taken))}, which "
                          f"{MODELING_FILE.name} already defines: rename it")
    pieces = [object_source(obj, router) for obj in objects]
    source = "\n\n\n".join([
        template.rstrip("\n"),
        f"# The FFN of router {router!r} ({code.ffn.__module__}), appended by `llm export`.\n\n" + pieces[0],
        *pieces[1:],
        f"FFNS[{router!r}] = {code.ffn.__name__}\n",
    ])
    missing = undefined_globals(source)
    if missing:
        raise ExportError(f"router {router!r}: export_code uses {', '.join(sorted(missing))}, which "
                          f"{MODELING_FILE.name} does not define (the exported code sees only its names): add it "
                          f"to export_code.helpers or define it inside the function that uses it")
    return source


def object_source(obj: Callable, router: str) -> str:
    """The source of a module-level function or class (a nested one would lose its enclosing scope)."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__qualname__ != obj.__name__ \
            or obj.__name__ == "<lambda>":
        raise ExportError(f"router {router!r}: export_code holds {obj!r}: expected functions and classes "
                          f"defined at the top level of a module")
    try:
        return textwrap.dedent(inspect.getsource(obj)).rstrip("\n")
    except (OSError, TypeError) as e:
        raise ExportError(f"router {router!r}: no source for {obj.__name__} in export_code ({e})") from None


def top_level_names(source: str) -> set[str]:
    """Names a module binds at its top level (assignments, imports, functions, classes)."""
    return {s.get_name() for s in symtable.symtable(source, "<modeling>", "exec").get_symbols()
            if s.is_assigned() or s.is_imported() or s.is_namespace()}


def undefined_globals(source: str) -> set[str]:
    """Global names the module's code reads but neither it nor Python's builtins define."""
    defined = top_level_names(source) | set(dir(builtins))
    read = {s.get_name() for table in _scopes(symtable.symtable(source, "<modeling>", "exec"))
            for s in table.get_symbols() if s.is_referenced() and s.is_global()}
    return read - defined


def _scopes(table: symtable.SymbolTable) -> Iterator[symtable.SymbolTable]:
    yield table
    for child in table.get_children():
        yield from _scopes(child)
