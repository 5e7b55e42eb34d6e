"""yuubin (郵便): a self-hosted mail server that is strict by default."""

__version__ = "0.1.0"
