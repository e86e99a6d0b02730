"""Live writes: documents added, replaced and deleted while the service answers.

* :mod:`~serve_app.live.changes`: batches, their validation, statistics and shard owners (pure);
* :mod:`~serve_app.live.log`: the durable write log (SQLite, WAL, fsynced per batch);
* :mod:`~serve_app.live.writer`: :class:`DocumentWriter`, the one writer of an index;
* :mod:`~serve_app.live.bm25`, :mod:`~serve_app.live.dense`, :mod:`~serve_app.live.documents`:
  the live views replicas search and read, exact as of any batch since their base;
* :mod:`~serve_app.live.follower`: how a replica pulls batches and reports what it applied;
* :mod:`~serve_app.live.merge`: folding the log into a new base index.

See docs/ARCHITECTURE.md ("The write path").
"""

from serve_app.live.changes import Batch, Change, StatsDelta, WriteRejected
from serve_app.live.writer import DocumentWriter, WriteResult, default_log_dir

__all__ = ["Batch", "Change", "DocumentWriter", "StatsDelta", "WriteRejected", "WriteResult", "default_log_dir"]
