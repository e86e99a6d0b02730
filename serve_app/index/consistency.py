"""Loading an index that may be rebuilt at the same moment: every load sees exactly one build.

:func:`serve_app.index.build_index` replaces an index by renaming directories, so a reader
never sees a half-written index. A *load*, however, takes several steps (manifest, checksums,
then the files) and looks each file up by path; if a rebuild swaps the directory between two
steps, the load mixes two builds: it fails with a false "sha256 differs" (old manifest, new
files) or, worse, checks one build and opens the files of the next. A loader can also hit the
instant between the two renames of the swap, when the directory is absent.

:func:`load_consistent` runs a load and checks that the directory it read is the one it started
with (same directory inode and same manifest bytes before and after); if not, or if the
directory was absent or replaced while the load failed, it retries (bounded). Once a load
succeeds, what it holds stays valid whatever happens to the directory: arrays are in memory or
memory-mapped, and on POSIX a mapped file lives until unmapped even after it is unlinked.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from serve_app.errors import IndexLoadError
from serve_app.index.files import MANIFEST

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts before giving up when the index keeps being replaced under the load.
ATTEMPTS = 5
_WAIT_S = 0.1


def _identity(directory: Path) -> Optional[tuple[int, int, bytes]]:
    """(device, inode, manifest bytes) of an index directory; None when it or its manifest is absent."""
    try:
        st = os.stat(directory)
        manifest = (directory / MANIFEST).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino, manifest


def load_consistent(directory: str | os.PathLike[str], load: Callable[[Path], T], *, attempts: int = ATTEMPTS) -> T:
    """``load(directory)``, retried until it ran entirely on one build of the index.

    A failure (``IndexLoadError``, or an ``OSError`` such as a file that vanished in a swap) is
    retried only when the directory was absent or replaced around it (a concurrent rebuild);
    otherwise (a damaged index) it is raised at once.
    """
    d = Path(directory)
    last: Optional[BaseException] = None
    for attempt in range(1, attempts + 1):
        before = _identity(d)
        try:
            result = load(d)
        except (IndexLoadError, OSError) as exc:  # a file vanishing under a swap is an OSError, not yet an IndexLoadError
            if before is not None and _identity(d) == before:
                raise  # the index did not change: it really is damaged or incomplete
            last = exc
        else:
            if before is not None and _identity(d) == before:
                return result
            last = None
        logger.info("%s was replaced during a load (attempt %d of %d); loading it again", d, attempt, attempts)
        time.sleep(_WAIT_S * attempt)
    if last is not None:
        raise last
    raise IndexLoadError(f"{d}: the index was replaced during each of {attempts} load attempts; is a build running in a loop?")
