"""--shard I/N keeps every N-th test starting at I: a suite split across N forks."""


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, help="I/N: run the I-th of N slices of the suite (0-based)")


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    keep = [item for position, item in enumerate(items) if position % count == index]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
