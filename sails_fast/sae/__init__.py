"""Sparse autoencoders' weights: `weights` (SAEWeights: SAELens or safetensors SAEs with ReLU, JumpReLU or
TopK activations, loaded from a local folder or a SAELens release; `check_sae_spec` for config files).
Training SAEs lives one layer up, in `sails_fast.sae_training`.

May import: sails_fast.core.
"""

from sails_fast.sae.weights import ACTIVATIONS, Activation, SAEWeights, check_sae_spec, load_sae

__all__ = ["ACTIVATIONS", "Activation", "SAEWeights", "check_sae_spec", "load_sae"]
