"""fimntk client package (filled by its own issue)."""
