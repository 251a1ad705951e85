"""Command-line front ends: the only code that calls sys.exit."""
