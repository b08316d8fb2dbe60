"""attnforge.frontends."""
