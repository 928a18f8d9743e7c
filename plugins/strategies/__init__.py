"""Built-in deploy strategies."""
