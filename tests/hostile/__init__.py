"""Hostile input, table-driven: every command refuses bad input cleanly (see test_cases.py)."""
