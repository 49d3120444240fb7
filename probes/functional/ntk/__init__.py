"""The pure half of the empirical NTK: a layer's kernel term and its two contractions (``terms``), and the memory
budgets and switches (``settings``). What records the terms from a model lives in ``probes.autodiff.ntk``; the
formulas are on the docs page ``docs/probes/ntk.md``."""
