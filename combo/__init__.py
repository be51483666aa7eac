"""combo."""
