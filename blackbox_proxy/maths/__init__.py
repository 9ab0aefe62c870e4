"""Pure maths of proxy tuning: no I/O, no globals, every random draw from an explicit generator.

- :mod:`.combiner`: proxy scores, temperature, top-p and the draw over one position's candidates;
- :mod:`.rejection`: speculative acceptance, residual and chunk walks with the hosted draft;
- :mod:`.importance`: sequence-level importance weights, SIR and the effective sample size;
- :mod:`.metrics`: total variation, KL and the top-k floor.

Left out: anything that talks to a model or an API (``decoding/``, ``local/``, ``hosts/``); this
package imports none of them.
"""
