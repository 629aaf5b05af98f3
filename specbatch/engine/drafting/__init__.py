"""Drafters: anything that proposes tokens cheaply for the target to verify (one module per kind)."""
