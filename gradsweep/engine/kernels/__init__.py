"""gradsweep's CPU kernels: ``build`` compiles and loads ``csrc/`` (on first use, cached by source, compiler and
CPU), ``stacked`` runs R small Linear layers at once through them, and ``fused`` is engine=compiled's step in two
calls of them."""

__all__ = ["build", "fused", "stacked"]
