"""Model adapters over diffusers, split for step-level serving, and tiny presets."""
