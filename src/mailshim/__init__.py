"""mailshim: a sendmail that hands every message to one SMTP listener and never loses it."""

__version__ = "0.1.0"
