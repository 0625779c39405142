"""Reporting: renderers of results (JSON, Markdown tables, figures) in
:mod:`badexpert.reporting.report`.

Import from the submodule; this package imports nothing itself.
"""
