"""The pool engine: the only code that changes a thin pool (device records, journal, recovery)."""
