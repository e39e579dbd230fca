"""Device workers: one process per device; executors that drive them."""
