"""fimntk service package (filled by its own issue)."""
