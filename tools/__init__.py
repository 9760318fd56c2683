"""Developer tooling around tierfs: real S3 servers for tests, the demo, the benchmark and a
quick POSIX check matrix (``posixcheck``).

Nothing here is shipped with the package; it exists so that tests, ``make demo`` and
``make bench`` start and stop their servers and mounts the same, well-tested way.
"""
