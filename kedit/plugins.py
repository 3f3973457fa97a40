"""The plugin manager: built-ins and installed packages, all through the ``kedit`` entry-point group.

Registries are rebuilt on demand from the hooks, so a plugin registered at run time (a test, a
notebook) is seen at once, and every registration is attributed to the package that made it.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import InputError, KeditError

GROUP = "kedit"
KINDS = ("editors", "regularizers", "evaluators", "architectures", "spec_importers")

_pm: pluggy.PluginManager | None = None
# plugin name (as registered with pluggy) -> (distribution name, version)
_origins: dict[str, tuple[str, str]] = {}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed() -> set[str] | None:
    raw = os.environ.get("KEDIT_LOAD_PLUGINS")
    if raw is None:
        return None
    return {_norm(p) for p in raw.split(",") if p.strip()}


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created on first use (never at import)."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        allowed = _allowed()
        for ep in md.entry_points(group=GROUP):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            version = ep.dist.version if ep.dist is not None else "unknown"
            # Built-ins always load; KEDIT_LOAD_PLUGINS restricts third-party packages (as llm does).
            if allowed is not None and _norm(dist) != "kedit" and _norm(dist) not in allowed:
                continue
            name = f"{dist}:{ep.name}" if _norm(dist) != "kedit" else ep.name
            if pm.has_plugin(name):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the whole tool down silently
                raise KeditError(f"plugin {name!r} from package {dist!r} failed to load: {exc}") from exc
            pm.register(module, name=name)
            _origins[name] = (dist, version)
        _pm = pm
    return _pm


def register_plugin(module: Any, name: str, package: str = "local", version: str = "0") -> None:
    """Register a plugin object at run time (tests, notebooks)."""
    get_plugin_manager().register(module, name=name)
    _origins[name] = (package, version)


def unregister_plugin(name: str) -> None:
    pm = get_plugin_manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin)
    _origins.pop(name, None)


def origin(plugin_name: str) -> tuple[str, str]:
    return _origins.get(plugin_name, ("local", "0"))


@dataclass(frozen=True)
class Registered:
    """One registered object and where it came from."""

    name: str
    obj: Any
    plugin: str
    package: str
    version: str


def _base(kind: str) -> type:
    from . import api
    from .arch import ArchSpec

    return {"editors": api.Editor, "regularizers": api.Regularizer, "evaluators": api.Evaluator,
            "spec_importers": api.SpecImporter, "architectures": ArchSpec}[kind]


def _check(kind: str, obj: Any, plugin: str, package: str) -> str:
    """The registry key of ``obj``, after checking it is what the hook promises: a subclass of
    the kind's base class with a non-empty ``name`` (an ArchSpec with a ``model_type``)."""
    base = _base(kind)
    label = kind[:-1].replace("_", " ")
    if kind == "architectures":
        ok = isinstance(obj, base) and bool(getattr(obj, "model_type", ""))
        want = "a kedit.arch.ArchSpec instance with a model_type"
    else:
        ok = isinstance(obj, type) and issubclass(obj, base) and isinstance(getattr(obj, "name", None), str) \
            and bool(obj.name) and not getattr(obj, "__abstractmethods__", None)
        want = f"a concrete kedit.api.{base.__name__} subclass with a name"
    if not ok:
        raise KeditError(f"plugin {plugin!r} (package {package}) registered {obj!r} as a {label}, "
                         f"but it is not {want}")
    return str(obj.model_type if kind == "architectures" else obj.name)


def _collect(kind: str) -> dict[str, Registered]:
    pm = get_plugin_manager()
    hook = getattr(pm.hook, f"register_{kind}")
    found: dict[str, Registered] = {}
    for impl in hook.get_hookimpls():  # registration order: built-ins first
        package, version = origin(impl.plugin_name)

        def register(obj: Any, _impl: Any = impl, _pkg: str = package, _ver: str = version) -> None:
            key = _check(kind, obj, _impl.plugin_name, _pkg)
            if key in found:
                prev = found[key]
                raise KeditError(
                    f"two plugins register the {kind[:-1].replace('_', ' ')} {key!r}: "
                    f"{prev.plugin!r} (package {prev.package}) and {_impl.plugin_name!r} (package {_pkg})"
                )
            found[key] = Registered(key, obj, _impl.plugin_name, _pkg, _ver)

        impl.function(register)
    return found


def registry(kind: str) -> dict[str, Registered]:
    if kind not in KINDS:
        raise ValueError(f"unknown registry {kind!r}")
    return _collect(kind)


def lookup(kind: str, name: str) -> Registered:
    """Find a registered object by name; an unknown name lists what exists."""
    reg = registry(kind)
    if name not in reg:
        label = kind[:-1].replace("_", " ")
        names = ", ".join(sorted(reg)) or "(none installed)"
        raise InputError(f"unknown {label} {name!r}; available: {names}")
    return reg[name]


def plugin_listing() -> list[dict[str, Any]]:
    """What ``kedit plugins`` prints: each plugin, its package, its hooks and what it registers."""
    pm = get_plugin_manager()
    regs = {kind: registry(kind) for kind in KINDS}
    out = []
    for name, plugin in sorted(pm.list_name_plugin()):
        package, version = origin(name)
        hooks = sorted(h.name for h in (pm.get_hookcallers(plugin) or []))
        registers = {
            kind: sorted(r.name for r in regs[kind].values() if r.plugin == name)
            for kind in KINDS
            if any(r.plugin == name for r in regs[kind].values())
        }
        out.append({"name": name, "package": package, "version": version, "hooks": hooks, "registers": registers})
    return out


def extend_cli(subparsers: Any) -> None:
    get_plugin_manager().hook.register_commands(subparsers=subparsers)


