"""What the load generators of the benchmarks share."""

from __future__ import annotations

import threading
import time
from typing import Callable


def run_concurrently(worker: Callable[[int], None], count: int) -> float:
    """Run worker(0) .. worker(count - 1) on their own threads; return the wall seconds until all finish."""
    threads = [threading.Thread(target=worker, args=(index,)) for index in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start
