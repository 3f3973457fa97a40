"""Options and defaults of the locate-then-edit family, importable without torch (the editor
plugins declare their ``Options`` from these at import time)."""
from __future__ import annotations

from pydantic import BaseModel, Field

ROTARY = {"llama", "mistral", "qwen2"}


def default_weight_decay(config) -> float:
    """The reference configs' v* weight decay: 1e-3 for rotary decoders, 0.5 for the GPT families."""
    return 1e-3 if config.model_type in ROTARY else 0.5


class ValueOptions(BaseModel):
    """The v*/z optimisation hyperparameters (names as in the reference notes)."""

    v_steps: int = Field(25, ge=1, description="Adam steps of the target-value optimisation")
    v_lr: float = Field(0.5, gt=0, description="Adam learning rate for δ")
    v_weight_decay: float | None = Field(
        None, ge=0, description="weight of ‖δ‖ / ‖v_init‖² in the loss; default 1e-3 for rotary decoders "
                                "(llama, mistral, qwen2), 0.5 for the GPT families, as in the reference configs")
    clamp_norm_factor: float = Field(4.0, gt=0, description="‖δ‖ ≤ clamp_norm_factor · ‖v_init‖")
    kl_factor: float = Field(0.0625, ge=0, description="weight of KL(p_δ ‖ p_0) on '{subject} is a'")
    v_chunk: int | None = Field(
        25, ge=1, description="optimise the targets this many requests at a time: the same optimisation (float32 "
                              "rounding aside) with a fraction of the memory. A MEMIT batch of 100 on SmolLM2 peaks "
                              "at 2.6 GB with 25, 5.7 GB all at once (null), at the same speed")
    early_stop_loss: float = Field(0.05, ge=0, description="a request stops once its loss is below this")
    stop_at_most_probable: bool = Field(
        False, description="most-probable early stopping (ENCORE, arXiv 2502.01636): a request also stops once its "
                           "new target is the most probable continuation, every token of it (teacher forced), on "
                           "every context template. Halves the steps and the perplexity damage of one batch of 100 "
                           "CounterFact edits but costs ES 0.06 and PS 0.14 there, so it is off except in encore")
