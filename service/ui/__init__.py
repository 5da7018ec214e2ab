"""The built-in dashboard served at ``/ui``: server-rendered HTML with inline SVG charts.

No asset comes from elsewhere (the lab's box may be offline): charts are drawn here
(:mod:`fimntk.service.ui.charts`), pages are put together in :mod:`fimntk.service.ui.pages`,
and one small first-party script and style sheet (``static/``) add the toggles.
"""
