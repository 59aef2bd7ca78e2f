"""fsa-distill's Hydra plugins (this folder is a portion of Hydra's `hydra_plugins` namespace package).

Hydra instantiates plugin classes only from the `hydra_plugins.` namespace, so the launcher class
lives here; its work is done in `fsa_distill.launcher`.
"""
