"""A pickled object whose unpickling runs a function: what a malicious checkpoint would carry.

``UNPICKLE_CALLS`` records every time it ran, so tests can assert that a refused checkpoint executed nothing.
"""

UNPICKLE_CALLS: list[str] = []


def record_unpickle(tag: str) -> str:
    UNPICKLE_CALLS.append(tag)
    return tag


class ArbitraryPayload:
    def __reduce__(self):
        return (record_unpickle, ("ran",))
