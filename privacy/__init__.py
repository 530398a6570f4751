"""privacy methods (not implemented yet; see the issues)."""
