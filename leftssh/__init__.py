"""leftssh: keep a local folder and a folder on an SSH peer in sync."""

__version__ = "0.1.0"
