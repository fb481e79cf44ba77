"""Launch settings read from the environment (for measuring alternatives inside a running model; read per call)."""
import os
from typing import Optional


def ints_from_env(name: str, fields: str) -> Optional[tuple]:
    """The comma-separated integers in environment variable `name`, one per comma-separated name in `fields`
    (e.g. "block_s,tiles_per_part,num_warps"); None when the variable is unset or empty."""
    text = os.environ.get(name)
    if not text:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != len(fields.split(",")):
        raise ValueError(f"{name}={text!r}: expected {len(fields.split(','))} integers {fields}")
    return values


def eviction_policy_from_env(name: str, default: str) -> str:
    """A tl.load eviction policy: environment variable `name` if set ("" for the hardware default, "evict_first"
    or "evict_last"), else `default`."""
    value = os.environ.get(name, default)
    if value not in ("", "evict_first", "evict_last"):
        raise ValueError(f"{name}={value!r}: expected '', 'evict_first' or 'evict_last'")
    return value


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
