"""Shared machinery of the locate-then-edit editors (ROME, MEMIT, AlphaEdit, EMMET): context
templates, fact-token lookup, key vectors, target-value optimisation and the closed-form solves.

Editor plugins import from here; none of it touches the caller's model: weight changes between
layers are passed to ``torch.func.functional_call`` as overrides.
"""
