"""What reads the stages' outputs for people: the report's tables and pages, plots, the
sample galleries and ``vlmflow status``. Reporting imports the core only.
"""
