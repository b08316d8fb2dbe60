"""attnforge.schedules."""
