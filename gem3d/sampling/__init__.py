"""gem3d.sampling: the noise schedule, clip sampling with known-frame replacement, and volume propagation."""
