"""store_schema."""
