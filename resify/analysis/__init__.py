"""Stage 2, analysis: what the graph holds: its layers, the shortcuts it has, the branches that only gate.

``analyze`` finds the layers (a parametric op and its followers) and the existing shortcuts on the
dominator trees; ``dataflow`` tells conditioning from a shortcut; ``gates`` finds the branches that
only scale another value; ``bounds`` the bounded outputs.
"""
