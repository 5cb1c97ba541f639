"""Activation sparsity: each token runs only part of the network (mixture-of-experts in ``moe``)."""
