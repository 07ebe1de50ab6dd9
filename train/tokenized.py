"""The training data, tokenized once per run start and shared by the ranks.

Loading, mixing and tokenizing millions of conversations takes minutes; under torchrun every
rank did it at once, on the same files. Rank 0 now does it: the rows go to an Arrow file
(rows.py) and what the run knows about them (stats, order, the file's name) to a small pickle
beside it, both in the run's work folder under a hash of everything they depend on (settings,
data files, tokenizer); the other ranks compute the same hash, read the pickle and map the
rows. A rank that does not find them (a work folder not shared by every node, or inputs that
differ there) tokenizes for itself into a folder of its own, and says so.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from tuneship.config.schema import TrainConfig
from tuneship.infra.fsutil import sha256_file, sha256_text

from .checkpoints import DATA_PREFIX as PREFIX
from .checkpoints import RUNTIME_KEYS


def cache_key(cfg: TrainConfig, tokenizer: Any) -> str:
    """A hash of what the tokenized rows depend on."""
    files = cfg.data_paths + ([cfg.eval_data] if cfg.eval_data else [])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    inputs = {
        "config": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUNTIME_KEYS},
        "data": {path: sha256_file(Path(path)) for path in files},
        "tokenizer": sha256_text(vocabulary),
        "template": tokenizer.chat_template,
        "specials": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
    }
    return sha256_text(json.dumps(inputs, sort_keys=True, default=str))[:20]


def cache_path(work: Path, key: str) -> Path:
    return work / f"{PREFIX}{key}.pkl"


def rows_path(work: Path, key: str) -> Path:
    return work / f"{PREFIX}{key}.arrow"


def drop_others(work: Path, key: str) -> None:
    """Earlier starts' files, made with other settings or data."""
    for old in work.glob(f"{PREFIX}*"):
        if not old.name.startswith(f"{PREFIX}{key}."):
            old.unlink(missing_ok=True)


def write(work: Path, key: str, prepared: Any) -> Path:
    """Write atomically (a rank never reads half a file)."""
    work.mkdir(parents=True, exist_ok=True)
    path = cache_path(work, key)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        pickle.dump(prepared, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read(work: Path, key: str) -> Any | None:
    """What rank 0 wrote for this key, or None. (Pickle: the file is this run's own, written
    by its rank 0 into its work folder, as its checkpoints are.)"""
    path = cache_path(work, key)
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return pickle.load(fh)
