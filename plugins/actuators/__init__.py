"""Built-in actuators: what runs instances."""
