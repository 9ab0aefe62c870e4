"""What long runs share, below every front end: the results file of a run (written whole, locked,
resumed: ``results.py``) and running several generations where one failure stops the rest
(``gather.py``). Used by ``blackbox-proxy batch`` and ``serve`` (:mod:`blackbox_proxy.apps`) and
by ``blackbox-proxy eval`` (:mod:`blackbox_proxy.evaluation`), which import it, never each other.
"""
