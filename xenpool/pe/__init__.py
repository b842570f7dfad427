"""xenpool-pe: the pool element."""
