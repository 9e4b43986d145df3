"""On-disk cache of measurements (plan timings, device calibrations), shared across processes.

One JSON file per entry, named by a hash of its key, under `<root>/<torch version>/<device>/`.
A writer fills a temporary file in the same folder and `os.replace`s it into place, which is
atomic on POSIX and Windows: concurrent writers of one entry leave one whole file, never a mix.
A file that does not parse, or whose stored key is not the key asked for, is ignored with a
warning; a folder that cannot be written only costs the reuse, never the run. The default root
is `compat.default_cache_dir()`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("runlora_fx")

FORMAT = "runlora_fx.cache/1"

Key = Mapping[str, Any]


def device_name(device: torch.device) -> str:
    """What the cache is keyed by besides torch's version: timings of one GPU model are reused
    on another of the same model, never on a different one."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu-{torch.backends.cpu.get_cpu_capability()}-{torch.get_num_threads()}threads"
    return device.type


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


class MeasurementCache:
    """Entries of one device under one torch version; `root=None` keeps nothing."""

    def __init__(self, root: str | os.PathLike[str] | None, device: torch.device) -> None:
        self.folder = None if root is None else (
            Path(root) / _slug(torch.__version__) / _slug(device_name(device))
        )
        self._warned_unwritable = False

    def _path(self, kind: str, key: Key) -> Path | None:
        if self.folder is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.folder / f"{_slug(kind)}-{digest}.json"

    def get(self, kind: str, key: Key) -> Any | None:
        path = self._path(kind, key)
        if path is None or not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            if entry["format"] != FORMAT or entry["kind"] != kind:
                raise ValueError(f"format {entry.get('format')!r}, kind {entry.get('kind')!r}")
            if entry["key"] != json.loads(json.dumps(key, sort_keys=True)):
                raise ValueError("its stored key is not the key asked for")
            return entry["value"]
        except (OSError, ValueError, KeyError, TypeError) as why:
            _warn(f"runlora: ignoring cache file {path} ({type(why).__name__}: {why})")
            return None

    def put(self, kind: str, key: Key, value: Any) -> None:
        path = self._path(kind, key)
        if path is None:
            return
        text = json.dumps({"format": FORMAT, "kind": kind, "key": key, "value": value},
                          sort_keys=True, indent=1)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as why:
            if not self._warned_unwritable:  # once per cache: the run goes on unchanged
                self._warned_unwritable = True
                _warn(f"runlora: cannot write the measurement cache at {self.folder} ({why}); "
                      "measurements will not be reused by the next run")


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
