"""Built-in sources: where desired counts come from."""
