"""headgain's core: the config and the head-class rule, the architecture registry, the
handle that attaches to a model, the per-pass read-out of S_v, and the compiled ops."""
