"""mailshim: a sendmail that hands every message to one SMTP listener and never loses it.

Trust: holds only the version string; imported by every process, whoever runs it.

Raises nothing.
"""

__version__ = "0.1.0"
