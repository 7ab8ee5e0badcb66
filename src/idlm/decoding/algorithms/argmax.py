"""argmax: ISD / R-ISD with argmax proposals, still exact.

Drafts are argmax q instead of draws from q. A deterministic proposal's law is one-hot at
the draft, so verification takes q = one-hot(s): accept s with probability p(s), else
draw the replacement from p with s removed (``acceptance.verify_sampled``). The output
still follows the AR law exactly, with more drafts accepted. Greedy rows are unchanged
(at T = 0 every proposal is already argmax q).

How it composes: only the proposal rule changes, so it is a variant of both drafting
algorithms (``gated=None``): on an IC model it runs as ISD, on a gated model as R-ISD with
the same gate. A request asks for it as mode ``isd`` with proposal ``argmax``; the
engine's statistics still name the system (``isd`` / ``risd``).
"""

from idlm.decoding.algorithms.base import Algorithm

ALGORITHM = Algorithm(
    name="argmax", summary="ISD / R-ISD proposing argmax q, verified as a one-hot proposal",
    mode="isd", drafts=True, gated=None, proposal="argmax")
