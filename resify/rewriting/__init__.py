"""Stage 4, rewriting: the plan carried out.

``install`` carries it out inside a copy of the user's model, owner by owner (the default);
``rewrite`` builds each site's modules and, with ``graph_module=True``, one GraphModule of the whole
model; ``modules`` holds the modules a converted model is made of.
"""
