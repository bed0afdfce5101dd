"""Hooks → statistics → factors: what the training backward (or a fitting pass) teaches about curvature.

Layers seen as ``W: [d_out, d_in]``, the hooks that capture ``(a, g)``, the accumulators, the
eigendecompositions and damped inverses, the post-hoc passes, and the tracker that drives them from
a training loop. Imports only `infl_plugin.config` and the leaves.
"""
