"""tierfs: an S3 bucket as POSIX files, with a persistent local chunk cache and crash-safe write-back."""

__version__ = "0.1.0"
