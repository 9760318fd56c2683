"""Dataset versions: named, immutable snapshot manifests of a prefix, and the read-only
namespace a mount serves from one (docs/snapshots.md).

Layer: beside ``meta`` (it imports ``store``, ``meta.keys`` and ``meta.records``, never the
cache, read path or anything above). ``format`` and ``sorter`` are pure; ``manifest``
fetches pages with ranged GETs in worker threads and keeps them in a local sparse file;
``namespace`` is what the FUSE adapter needs of a namespace (``SnapshotNamespace``): its
synchronous calls only touch pages already local and may run on the loop, its async calls
fetch pages through the ``run_blocking`` they are given. ``build`` and ``commands`` are the
``tierfs snapshot`` commands (blocking; never on a loop).
"""
