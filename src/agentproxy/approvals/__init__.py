"""Approval gates: hold high-risk calls until a permitted human says yes."""
