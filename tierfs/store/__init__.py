"""The object-store layer: everything tierfs asks of S3, and nothing else.

``objectstore`` holds the :class:`~tierfs.store.objectstore.ObjectStore` protocol (the seam
every layer above talks to) and its boto3 implementation; ``s3errors`` is the one map from S3
answers to the tierfs error vocabulary (``classify``), used by both clients; ``crtget`` sends
small ranged GETs through awscrt; ``faultstore`` wraps any store to fail, delay
or stall chosen calls in tests. This layer imports only the bottom modules (``tierfs.errors``,
``tierfs.units``, ``tierfs.config``), never a layer above it, not even metrics: latency leaves
through the ``observe`` callback. Trio loop: none. Every store method is blocking and runs in
a worker thread behind the S3 ``CapacityLimiter`` (``trio.to_thread``); a new backend goes here
as another ``ObjectStore``.
"""
