"""timelit: Temporal Integration of Model Expertise (arXiv 2412.06712) on FoMo-in-Flux (arXiv 2408.14471)."""

__version__ = "0.1.0"
