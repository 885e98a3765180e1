"""`merit_lab.models.cpu_memory.keep_freed_memory`: what it asks of glibc and when, that glibc
then serves a freed block again without faulting its pages in, and that the gradient stage's
rows do not change by a bit."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import merit_lab.gradients.estimate as estimate_mod
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.gradients.sketch import SketchSpec
from merit_lab.models import cpu_memory
from merit_lab.models.cpu_memory import keep_freed_memory


class _Libc:
    """Records mallopt / malloc_trim calls; mallopt answers ``answer`` (1: glibc's success)."""

    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return self.answer

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


KEEP = [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]
RESTORE = [("mallopt", -4, 65536), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]


@pytest.fixture
def libc(monkeypatch):
    fake = _Libc()
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: fake)
    for var in cpu_memory._USER_TUNING:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "")
    return fake


def test_the_outermost_block_sets_and_restores_even_on_an_error(libc):
    with keep_freed_memory("cpu") as kept:
        assert kept is True and libc.calls == KEEP
        with keep_freed_memory() as inner:
            assert inner is True
        assert libc.calls == KEEP  # the inner block neither set nor restored
    assert libc.calls == KEEP + RESTORE
    libc.calls.clear()
    with pytest.raises(RuntimeError, match="boom"), keep_freed_memory():
        raise RuntimeError("boom")
    assert libc.calls == KEEP + RESTORE and cpu_memory._depth == 0


def test_it_leaves_malloc_alone_off_the_cpu_where_refused_or_tuned(libc, monkeypatch):
    for device in ("meta", "cuda:0"):
        with keep_freed_memory(device) as kept:
            assert kept is False
    assert libc.calls == []
    libc.answer = 0  # a C library whose mallopt refuses: its defaults are set back at once
    with keep_freed_memory() as kept:
        assert kept is False
    assert libc.calls == [KEEP[0], *RESTORE] and cpu_memory._depth == 0
    libc.calls.clear()
    libc.answer = 1
    for var, value in (("MALLOC_TRIM_THRESHOLD_", "1000"), ("LD_PRELOAD", "/x/libjemalloc.so")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with keep_freed_memory() as kept:
                assert kept is False
    assert libc.calls == []
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)  # not glibc
    with keep_freed_memory() as kept:
        assert kept is False


_FAULTS = textwrap.dedent(
    """
    import json, resource, torch
    from merit_lab.models.cpu_memory import keep_freed_memory

    def cycle(n=2**24):  # a 64 MiB block, allocated, written and freed
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(n)
        x.fill_(1.0)
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    out = {"default": [cycle() for _ in range(6)]}
    with keep_freed_memory() as kept:
        out["kept"], out["cycles"] = kept, [cycle() for _ in range(40)]
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_glibc_serves_a_freed_block_again_without_faulting_it_in():
    """In a fresh interpreter (this one's heap holds what other tests freed): by default every
    64 MiB block is a fresh mmap whose 16,384 pages all fault in; inside the block, once the heap
    has grown to hold it (a few cycles: posix_memalign asks a little more than it freed), the
    same block comes back from the heap with no page faulted in."""
    import json

    if cpu_memory._glibc() is None:
        pytest.skip("not glibc")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    env["LD_PRELOAD"] = ""
    proc = subprocess.run(
        [sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True, env=env
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    pages = 2**24 * 4 // 4096
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    huge = thp.is_file() and "[always]" in thp.read_text()  # then a fault maps 2 MiB
    assert all(f >= (pages // 512 if huge else pages) for f in out["default"]), out["default"]
    assert out["kept"] is True
    assert sum(out["cycles"][-8:]) < pages // 100, out["cycles"]


def test_the_stage_rows_are_the_same_bits_with_memory_kept_or_not(
    pico_model, demo_tokenizer, monkeypatch
):
    from merit_lab.data.mixture import load_mixture

    mix = load_mixture("demo")
    mix = mix.select(mix.names[:3])
    kw = {"sketch": SketchSpec(dim=512, seed=1), "n": 12, "folds": 3, "progress": False}
    seen = []
    real = estimate_mod.keep_freed_memory

    @contextlib.contextmanager
    def noting(device):
        with real(device) as kept:
            seen.append(kept)
            yield kept

    monkeypatch.setattr(estimate_mod, "keep_freed_memory", noting)
    kept = estimate_gradients(pico_model, demo_tokenizer, mix, **kw)
    monkeypatch.setattr(estimate_mod, "keep_freed_memory", lambda d: contextlib.nullcontext(False))
    plain = estimate_gradients(pico_model, demo_tokenizer, mix, **kw)
    assert seen == [cpu_memory._glibc() is not None and not cpu_memory._user_tuned()]
    np.testing.assert_array_equal(kept.rows, plain.rows)
    assert kept.folds is not None
    np.testing.assert_array_equal(kept.folds, plain.folds)
