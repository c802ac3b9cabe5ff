"""Run and sweep folder names that no other run can get.

The default ``hydra.run.dir`` and ``hydra.sweep.dir`` end in ``${unique:}``: this process's id and
four random hex digits (``<pid>-<hex>``). Two jobs started in the same second, on one machine (distinct
process ids) or on several sharing a file system (the random part), never share a folder, so they
never overwrite each other's results.json, checkpoint or history. The value is drawn once per
process and cached in the composed config, so a sweep's jobs share their sweep folder, and Hydra
copies the cache into every job's config.
"""
from __future__ import annotations

import os
import secrets

from omegaconf import OmegaConf

_TOKEN: list[str] = []


def unique_token() -> str:
    """``<pid>-<4 hex digits>``: fixed for the life of this process."""
    if not _TOKEN:
        _TOKEN.append(f"{os.getpid()}-{secrets.token_hex(2)}")
    return _TOKEN[0]


def register_resolvers() -> None:
    """``${unique:}`` for the config files; safe to call more than once."""
    if not OmegaConf.has_resolver("unique"):
        OmegaConf.register_new_resolver("unique", unique_token, use_cache=True)
