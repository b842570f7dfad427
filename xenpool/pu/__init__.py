"""xenpool-pu: the pool user keeper."""
