"""The views: how plans and reports are shown. They compute nothing.

``cells`` (the cells every table shares), ``tables`` (the report as text and Markdown),
``plan_table`` (the plan's table), ``plots`` and ``history_plot`` (figures, matplotlib), ``html``,
``diagram`` and ``chart`` (notebook displays and self-contained pages, SVG).
"""
