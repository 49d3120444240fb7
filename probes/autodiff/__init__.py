"""What needs the model itself: factor recording with hooks, layer plans, parameter swaps, per-sample gradients,
Hessian-vector products, FSDP gathers and the exchange across ranks.

Below the engine and above ``probes.functional`` (pure tensor maths); see ``docs/architecture.md``.
"""
