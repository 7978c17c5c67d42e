"""tmkt/train."""
