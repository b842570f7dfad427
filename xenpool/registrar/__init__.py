"""xenpool-registrar: the pool registrar."""
