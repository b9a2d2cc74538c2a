"""gradsweep's Hydra plugins: the fused launcher (hydra/launcher=gradsweep) and its sweeper (hydra/sweeper=gradsweep)."""
