"""``kedit diff export --format peft``: a chain of low-rank diffs as a PEFT LoRA adapter.

A LoRA adapter adds ``scaling · B @ A`` to a module's weight (``B``: out × r, ``A``: r × in, in
``nn.Linear``'s layout; GPT-2's ``Conv1D`` stores the transpose, which PEFT reads with
``fan_in_fan_out``). A low-rank diff ``ΔW = u @ v`` in the stored layout is exactly that with
``lora_alpha = r`` (scaling 1): ``B = u, A = v`` for Linear, ``B = vᵀ, A = uᵀ`` for Conv1D. So
``PeftModel.from_pretrained(base, DIR)`` computes the edited model, to float rounding (LoRA runs
beside the weight instead of merging it). Dense, sparse and masked deltas have no exact LoRA form:
they are refused, or with ``svd_rank`` approximated by their top singular directions, the
relative error recorded per module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from . import delta as D
from .errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE = "kedit_provenance.json"


def _layout(model: torch.nn.Module, param: str) -> tuple[str, bool]:
    """(module path, whether the module stores its weight transposed) for an edited weight."""
    if not param.endswith(".weight"):
        raise InputError(f"{param}: PEFT's LoRA adapts module weights; this diff edits another tensor")
    path = param[: -len(".weight")]
    module = model.get_submodule(path)
    if isinstance(module, torch.nn.Linear):
        return path, False
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight stored (in, out)
        return path, True
    raise InputError(f"{param}: a {type(module).__name__} module; PEFT LoRA export covers Linear and Conv1D")


def _factors(name: str, delta: D.Delta, svd_rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(u, v, relative Frobenius error or None when exact) with u @ v ≈ delta."""
    if isinstance(delta, D.LowRank):
        return delta.u.double(), delta.v.double(), None
    if svd_rank is None:
        kind = D.encoding_name(delta)
        raise InputError(f"{name}: a {kind} delta has no exact LoRA form (PEFT adapters are low-rank: ROME, MEMIT "
                         "and their family, MEND); pass --svd-rank R to approximate it by its top R singular "
                         "directions (the error is recorded), or export a model folder (--format folder)")
    dense = D.to_dense(delta, torch.float64)
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    r = min(svd_rank, S.numel())
    u, v = U[:, :r] * S[:r], Vh[:r]
    norm = float(dense.norm())
    return u, v, (float((dense - u @ v).norm()) / norm if norm else 0.0)


def export_peft(diffs: Sequence[Any], model: torch.nn.Module, out: str | os.PathLike, base_name: str,
                svd_rank: int | None = None) -> dict[str, Any]:
    """Write the chain's summed deltas as a LoRA adapter folder ``out`` (written atomically by
    the caller's ``atomic_dir``); returns what was written per module. ``model`` is the chain's
    base (the layout of each edited module is read from it)."""
    from safetensors.torch import save_file

    total: dict[str, D.Delta] = {}
    for d in diffs:
        for name, delta in d.deltas.items():
            total[name] = D.add(total[name], delta) if name in total else delta
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    transposed = set()
    for name, delta in sorted(total.items()):
        path, is_t = _layout(model, name)
        transposed.add(is_t)
        u, v, err = _factors(name, delta, svd_rank)
        lora_b, lora_a = (v.T, u.T) if is_t else (u, v)  # B @ A is the (out, in) delta
        tensors[f"base_model.model.{path}.lora_A.weight"] = lora_a.to(torch.float32).contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = lora_b.to(torch.float32).contiguous()
        modules[path] = {"rank": int(u.shape[1]), "exact": err is None,
                         **({"svd_relative_error": err} if err is not None else {})}
    if len(transposed) > 1:
        raise InputError("the diff edits both Linear and Conv1D modules; one PEFT adapter has one fan_in_fan_out")
    if not modules:
        raise InputError("the diffs edit nothing: no adapter to write")
    r = max(m["rank"] for m in modules.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": r, "target_modules": sorted(modules), "fan_in_fan_out": transposed == {True},
        "lora_dropout": 0.0, "bias": "none", "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
        # per-module ranks; alpha = rank keeps every module's scaling at 1, so B @ A is the delta itself
        "rank_pattern": {p: m["rank"] for p, m in modules.items() if m["rank"] != r},
        "alpha_pattern": {p: m["rank"] for p, m in modules.items() if m["rank"] != r},
    }
    folder = Path(out)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    provenance = {"diffs": [d.id for d in diffs], "base": base_name, "modules": modules,
                  "note": "written by `kedit diff export --format peft`; the diffs' manifests hold the full provenance"}
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return provenance
