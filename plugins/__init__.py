"""xenpool\x27s built-in plugins: load metrics, pool policies, fencing, storage, hypervisors."""
