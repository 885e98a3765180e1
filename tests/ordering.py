"""``pytest --order reverse`` or ``--order random [--order-seed N]``: the tests of each file, and
the files, in another order, to show that no test leans on another's side effects (a pytest
plugin; conftest.py). Tests stay grouped by file, so module fixtures are built once."""

from __future__ import annotations

import random


def pytest_addoption(parser) -> None:
    group = parser.getgroup("merit-lab")
    group.addoption(
        "--order",
        choices=("file", "reverse", "random"),
        default="file",
        help="run the files, and the tests in each, in file order (default), reversed or shuffled",
    )
    group.addoption(
        "--order-seed", type=int, default=0, help="the seed of --order random (default 0)"
    )


def reorder(items: list, order: str, seed: int = 0) -> list:
    """``items`` grouped by file (first appearance), with files and tests reversed or shuffled."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    groups = list(files.values())
    if order == "reverse":
        return [item for group in reversed(groups) for item in reversed(group)]
    if order == "random":
        rng = random.Random(seed)
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
    return [item for group in groups for item in group]


def pytest_collection_modifyitems(session, config, items) -> None:
    order = config.getoption("order")
    if order != "file":
        items[:] = reorder(items, order, config.getoption("order_seed"))


def pytest_report_header(config) -> str | None:
    order = config.getoption("order")
    if order == "random":
        return f"test order: random, seed {config.getoption('order_seed')}"
    return None if order == "file" else f"test order: {order}"
