"""Quality-versus-size reports: a table, three plots, report.md, report.html and report.json.

``table`` gathers one row per variant from the stage summaries, ``advice`` picks the
smallest variant that loses nothing measurable, ``cells`` defines the columns, ``plots``
draws them with matplotlib, ``markdown`` and ``html`` write the pages and ``build`` ties it
together (:func:`mathq.report.stage.build_report`). matplotlib is imported only when plots
are drawn.
"""
