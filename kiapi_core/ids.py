"""Job and file ids: random, prefixed, and checked by pattern before they touch a store or a disk."""

from __future__ import annotations

import re
import secrets

JOB_ID = re.compile(r"^job_[0-9a-f]{16}$")
FILE_ID = re.compile(r"^file_[0-9a-f]{16}$")


def new_job_id() -> str:
    return f"job_{secrets.token_hex(8)}"


def new_file_id() -> str:
    return f"file_{secrets.token_hex(8)}"


def is_job_id(value: str) -> bool:
    return bool(JOB_ID.fullmatch(value))


def is_file_id(value: str) -> bool:
    return bool(FILE_ID.fullmatch(value))
