"""Series completion."""
