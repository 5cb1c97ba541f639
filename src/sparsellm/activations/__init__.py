"""Activation sparsity: zero small inputs of the linear layers at run time (TEAL)."""

from .teal import ActivationSparsity, calibrate, held_out_sparsity, sparsify_activations

__all__ = ["ActivationSparsity", "calibrate", "held_out_sparsity", "sparsify_activations"]
