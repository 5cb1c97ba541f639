"""Activation sparsity: zero small inputs of the linear layers at run time (TEAL), or run each token
through only part of the network (mixture-of-experts, in ``moe``)."""

from .teal import ActivationSparsity, calibrate, held_out_sparsity, sparsify_activations

__all__ = ["ActivationSparsity", "calibrate", "held_out_sparsity", "sparsify_activations"]
