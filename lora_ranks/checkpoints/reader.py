"""One checkpoint folder, opened for lazy per-tensor reads, and its fingerprints.

A Hugging Face model folder holds ``config.json`` and ``*.safetensors`` weights (one file, or shards listed in
``model.safetensors.index.json``). Only shard headers are read on open; ``get(name)`` memory-maps one tensor,
so peak memory is a few matrices, never a model. Pickle weights (``*.bin``, ``*.pt``) can run code when
loaded, so they are refused unless ``allow_pickle``, and then loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from .hub import CheckpointError, resolve_model_path

__all__ = ["Checkpoint"]


class Checkpoint:
    """A safetensors model folder opened for lazy, per-tensor reads.

    Raises (on construction):
        CheckpointError: no such folder or hub id, no or invalid ``config.json``, no weights, pickle-only weights
            without ``allow_pickle``, a shard the index lists but the folder lacks, or an unreadable shard.
    """

    def __init__(self, name_or_path: str | Path, *, allow_pickle: bool = False, revision: str | None = None):
        self.source = str(name_or_path)
        self.root = resolve_model_path(name_or_path, revision=revision)
        config_path = self.root / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.root} has no config.json; is it a Hugging Face model folder?")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
        self.allow_pickle = allow_pickle
        self._handles: dict[Path, object] = {}  # shard -> open safe_open handle (or loaded pickle state)
        self._handles_lock = threading.Lock()  # modules of a layer are read from several threads
        self.tensor_files: dict[str, Path] = self._index_tensors()

    # -- discovery -----------------------------------------------------------------------------
    def _index_tensors(self) -> dict[str, Path]:
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index (needs 'weight_map'): {exc}") from exc
            files = {name: self.root / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index} lists shard {shard.name}, which is missing from {self.root}")
            return files
        shards = sorted(self.root.glob("*.safetensors"))
        if shards:
            return {name: shard for shard in shards for name in self._safe_keys(shard)}
        pickles = sorted(self.root.glob("*.bin")) + sorted(self.root.glob("*.pt"))
        if pickles:
            if not self.allow_pickle:
                raise CheckpointError(
                    f"{self.root} holds only pickle-based weights ({pickles[0].name}); loading pickles can run "
                    "arbitrary code, so they are refused. Convert the model to safetensors, or pass "
                    "--allow-pickle (allow_pickle=True) to load them with torch.load(weights_only=True)."
                )
            return {name: shard for shard in pickles for name in self._pickle_state(shard)}
        raise CheckpointError(f"{self.root} contains no *.safetensors weights")

    def file_problems(self) -> list[str]:
        """Every shard's header read and checked (truncated or corrupt files, tensors the index misplaces).

        Opening a sharded checkpoint reads only its index; this reads every shard's header (cheap), which is
        where a truncated download shows: safetensors checks that the data the header describes is all there.
        """
        problems = []
        for shard in sorted(set(self.tensor_files.values())):
            if shard.suffix != ".safetensors":
                continue
            try:
                keys = set(self._safe_keys(shard))
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            misplaced = [k for k, f in self.tensor_files.items() if f == shard and k not in keys]
            if misplaced:
                problems.append(f"{shard} lacks {len(misplaced)} tensor(s) its index places there, e.g. {misplaced[0]!r}")
        return problems

    @staticmethod
    def _safe_keys(shard: Path) -> list[str]:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors file {shard}: {exc} (truncated or corrupt?)") from exc

    def _pickle_state(self, shard: Path) -> dict[str, torch.Tensor]:
        with self._handles_lock:
            if shard not in self._handles:
                try:  # weights_only: tensors and containers only, no arbitrary objects
                    state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:
                    raise CheckpointError(f"cannot load {shard} with torch.load(weights_only=True): {exc}") from exc
                self._handles[shard] = state
            return self._handles[shard]

    def _handle(self, shard: Path):
        with self._handles_lock:
            if shard not in self._handles:
                try:
                    self._handles[shard] = safe_open(str(shard), framework="pt")
                except OSError:
                    raise  # the storage failed (worth a retry), not the file
                except Exception as exc:
                    raise CheckpointError(f"cannot open {shard}: {exc}") from exc
            return self._handles[shard]

    # -- reads ----------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.tensor_files

    def keys(self) -> list[str]:
        return list(self.tensor_files)

    def shape(self, key: str) -> tuple[int, ...]:
        shard = self._file(key)
        if shard.suffix != ".safetensors":
            return tuple(self._pickle_state(shard)[key].shape)
        return tuple(self._handle(shard).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """Stored dtype as safetensors names it (``F32``, ``BF16``, ``I8``, ...; ``torch.float32`` for pickles)."""
        shard = self._file(key)
        if shard.suffix != ".safetensors":
            return str(self._pickle_state(shard)[key].dtype)
        return str(self._handle(shard).get_slice(key).get_dtype())

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (memory-mapped, in its stored dtype)."""
        shard = self._file(key)
        if shard.suffix != ".safetensors":
            return self._pickle_state(shard)[key]
        try:
            return self._handle(shard).get_tensor(key)
        except OSError:
            raise  # the storage failed (worth a retry), not the file
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from {shard}: {exc} (truncated or corrupt file?)") from exc

    def _file(self, key: str) -> Path:
        try:
            return self.tensor_files[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is not in checkpoint {self.root}") from None

    # -- identities -----------------------------------------------------------------------------
    def content_digest(self, keys: Iterable[str]) -> str:
        """sha256 over the stored bytes, dtype and shape of the tensors ``keys``, in the given order."""
        digest = hashlib.sha256()
        for key in keys:
            tensor = self.get(key).contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        return digest.hexdigest()

    def header_fingerprint(self) -> str:
        """sha256 over every shard's safetensors header and size: changes whenever names, shapes, dtypes or file
        sizes change. Cheap (reads headers only); content hashes are per layer."""
        digest = hashlib.sha256()
        for shard in sorted(set(self.tensor_files.values())):
            with open(shard, "rb") as handle:
                head = handle.read(8)
                digest.update(shard.name.encode())
                digest.update(head)
                if shard.suffix == ".safetensors" and len(head) == 8:
                    digest.update(handle.read(int.from_bytes(head, "little")))
            digest.update(str(shard.stat().st_size).encode())
        return digest.hexdigest()

    def close(self) -> None:
        """Drop open file handles (their memory-mapped pages leave the process); reads reopen lazily."""
        with self._handles_lock:
            self._handles.clear()

    def __getstate__(self):  # open file handles and locks do not pickle; reopen lazily after a round trip
        state = dict(self.__dict__)
        state["_handles"] = {}
        del state["_handles_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._handles_lock = threading.Lock()
