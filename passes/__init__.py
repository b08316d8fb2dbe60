"""attnforge.passes."""
