"""What runs inside a model for each request: the core (core.py) and what it uses on the way."""
