"""The engine, one concern a module:

- ``session``: the ``Session``'s lifecycle and public methods (the public ``attach`` is ``probes.attach``, above
  the engine, since it plans the sinks);
- ``run``: the run context (ranks, device, sharding, logdir, mask key, label shift, strictness, the step clock);
  ``probeset``: the attached probes, shared by reference; ``measured``: what a measurement or flush returns;
  ``resume``: the one resume rule (no second step-0 point);
- ``spec``: probe specs (parsed once, shared with the integrations) and the checks of ``attach``'s options;
- ``probe_pass``: the one probe pass (chunks, what each site keeps, eval mode, modes and RNG restored) and the probe
  batch that follows the model's device and dtype;
- ``capture``: where activations come from (module hooks, functional calls, sites, training forwards, masks);
- ``passive``: training forwards observed and flushed; ``measure``: measurements of the active probes;
- ``cadence``: due steps, the overhead budget, a replaceable clock; ``failures``: switched-off probes and notices;
- ``output``: records to the sinks, one point per tag and step; ``distributed``: the rank protocol;
- ``inputs``: probe inputs of any forward signature and the output the probes use.

Lifecycle: ``attach`` either returns a working session or raises and leaves nothing behind (no hook, no writer, no
file). Everything knowable at attach raises there: options, the probe batch, a probe that cannot apply to this
model, labels that do not fit its outputs (the first measurement, or ``Probe.check`` without one). The at-attach
measurement (step 0) is held back until the session is first used, so that a resumed run writes no second step-0
point (``probes.engine.resume``). After ``close()`` every method but
``close()`` raises ``ProbesClosedError``.
"""
