"""The daemon hands freed C heap back to the kernel (glibc's malloc_trim)."""

from __future__ import annotations

import asyncio
import platform
from pathlib import Path

import pytest

from agentd import housekeeping


def _rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_heap_goes_back_to_the_kernel() -> None:
    # Many small blocks (below glibc's mmap threshold: they live in the heap), all freed but
    # one at the end, which keeps the heap's top from shrinking on its own.
    blocks = [bytearray(4000) for _ in range(20_000)]
    keep = bytearray(4000)
    del blocks
    before = _rss_anon_kb()
    assert housekeeping.trim_heap() is True
    after = _rss_anon_kb()
    assert before - after > 20_000, (before, after)  # most of the ~80 MB freed is given back
    del keep


def test_the_loop_trims_on_its_period() -> None:
    results: list[bool | None] = []

    def trim() -> bool | None:
        results.append(housekeeping.trim_heap())
        return results[-1]

    async def go() -> None:
        task = asyncio.create_task(housekeeping.heap_trim_loop(0.01, trim))
        await asyncio.sleep(0.2)
        assert not task.done()  # nothing released is no reason to stop
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    if housekeeping.trim_heap() is None:
        pytest.skip("no malloc_trim here: the loop ends at once")
    asyncio.run(go())
    assert len(results) >= 3 and all(isinstance(r, bool) for r in results)


def test_without_malloc_trim_the_loop_ends() -> None:
    async def go() -> None:
        await asyncio.wait_for(housekeeping.heap_trim_loop(0.01, lambda: None), timeout=5)

    asyncio.run(go())  # returns: a C library without malloc_trim stops the loop
