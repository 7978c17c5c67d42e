"""tmkt/data."""
