"""The archext benchmarks, one command (``archext-bench`` or ``python -m archext.bench``):

    archext-bench [OPTIONS]          the norms and activations (`kernels`; the default)
    archext-bench rope [OPTIONS]     the fused q/k rotation (`rope`)
    archext-bench loss [OPTIONS]     cross-entropy, attention softmax, fused linear cross-entropy
                                     (`loss`)
    archext-bench attention [OPTIONS] the tiled attention against the materialised S x S scores
                                     (`attention`: peak memory and time)

`common` holds what they share (timing, the machine description). The subcommand modules are
imported only when run, so that ``python -m archext.bench.rope`` runs a module that is not yet
loaded.
"""
from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "rope":
        from . import rope

        return rope.main(argv[1:])
    if argv and argv[0] == "attention":
        from . import attention

        return attention.main(argv[1:])
    if argv and argv[0] == "loss":
        from . import loss

        return loss.main(argv[1:])
    from . import kernels

    return kernels.main(argv)
