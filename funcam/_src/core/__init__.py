"""The pure core: splits, the gradient engine, the method rules and table, rollout and relevance, guided
backprop, post-processing and metrics. Imports ``funcam._src.base`` and ``funcam._src.cuts``, never the
application or the command line."""
