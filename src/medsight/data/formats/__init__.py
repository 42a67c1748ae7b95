"""Readers, one module per distributed layout; FORMATS is filled in below."""
