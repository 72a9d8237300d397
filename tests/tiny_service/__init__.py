"""A tiny service declared outside the platform's own list (PERCEPT_EXTRA_SERVICES): it proves that a new
service runs end to end with no change to workers/ or percept/."""
