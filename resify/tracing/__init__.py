"""Stage 1, tracing: the model's forward as a torch.fx graph, with every node's shape.

``trace`` is the entry point (symbolic tracing, and the concrete tracer where control flow depends on
values: ``tracers``); ``shapes`` and ``shape_rules`` put a shape and dtype on every node; ``copying``
makes the structural copy that tracing and installing work on; ``units`` and ``calls`` trace a model
whose root does not trace as a whole, child by child; ``inputs`` normalises the example input.
"""
