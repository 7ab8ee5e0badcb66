"""Prefect flows (see flows/idlm_full.py)."""
