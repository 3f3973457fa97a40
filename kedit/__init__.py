"""kedit: knowledge editing with plugin editors and verifiable safetensors diffs."""
from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("kedit")

__all__ = ["hookimpl", "__version__"]


def __getattr__(name: str) -> str:
    # Lazy, so importing kedit never touches package metadata it does not need.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("kedit")
        except PackageNotFoundError:  # running from a source tree
            return "0.0.0+local"
    raise AttributeError(name)
