"""The error of a cache plan that cannot work: raised where the plan is made (probe/cacheplan.py) and where its
shuffle window is used (probe/epochorder.py, probe/stream.py). A home of its own because the plan imports the
epoch order (`piece_rows`), so the order cannot import it from the plan."""


class CachePlanError(ValueError):
    """A cache mode / budget / window that cannot work for this split."""


__all__ = ["CachePlanError"]
