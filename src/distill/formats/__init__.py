"""On-disk formats, below both the teachers that read them and the jobs that write them.

* :mod:`distill.formats.encoding`: the byte encodings of a token's top-k targets (``"compact"``, ``"fp16"``).
* :mod:`distill.formats.reader`: a top-k cache folder (manifest, checksummed parquet shards, row keys) and its
  errors; :class:`~distill.formats.reader.CacheReader` reads it.
* :mod:`distill.formats.sampling`: sampled targets (priority sampling) and the per-row seeds a cache uses.

This layer imports nothing of ``distill`` but :mod:`distill.checks` (the table: ``docs/architecture.md``), so
:class:`distill.teachers.CachedTeacher` can read a cache that :func:`distill.cache.build_cache`, which runs
teachers, wrote. The public names stay importable from :mod:`distill.cache`.
"""
