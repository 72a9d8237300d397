"""Public ids: a type prefix and a ULID, so ids sort by creation time and say what they name."""

from ulid import ULID


def new_id(prefix: str) -> str:
    return f"{prefix}_{ULID()}"
