"""Decoding-time baselines that headgain is compared against (not part of the method).

`headgain.baselines.vcd`: visual contrastive decoding, the paper's cheapest decoding
baseline, used by ``benchmarks/overhead.py``.
"""

from . import vcd

__all__ = ["vcd"]
