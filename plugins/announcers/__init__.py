"""Built-in announcers: where healthy instances are published."""
