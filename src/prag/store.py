"""The stores of a workspace: augmentations and adapters, keyed by what built them.

    STORE/                              the workspace (HOME) unless a store is named (`--store`)
      augment/<key>/<xx>/<hash>.json    one document's rewrites and QA pairs
      adapters/<key>/<xx>/<hash>.safetensors   one document's LoRA (stacked A/B per module)
      adapters/<key>/meta.json          model, LoRA and training config of this store

A document's files are found from its id alone (a hash names them), so lookup
is O(1) and needs no catalog to stay in sync. The store is the only record of
what is done, for one process or for many machines: every file is written once
and whole (a temporary name, then an exclusive link; on an object store a
conditional PUT), so a crash leaves either the whole file or nothing, a retried
task never replaces what another attempt stored, and a rerun skips what exists.

A store's root is a local directory (a shared filesystem mounted on every
machine serves a cluster) or an fsspec URL such as s3://bucket/prefix (S3 and
S3-compatible servers through s3fs, configured by the usual AWS_* variables,
AWS_ENDPOINT_URL included). Local adapters are loaded by memory map.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

from .atomic import atomic_create, atomic_write
from .augment import Augmentation
from .lora import Adapter


def doc_filename(doc_id: str) -> str:
    digest = hashlib.sha1(doc_id.encode()).hexdigest()
    return f"{digest[:2]}/{digest}"


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def join(root: str | Path, *parts: str) -> str | Path:
    """`root` / parts, for a local path or a URL."""
    return "/".join([str(root).rstrip("/"), *parts]) if is_url(root) else Path(root).joinpath(*parts)


class Location:
    """A directory on this machine or under an fsspec URL, with the few file operations the stores need."""

    def __init__(self, root: str | Path):
        self.is_url = is_url(root)
        if self.is_url:
            import fsspec

            # no listing cache: other machines add files while this one runs
            self.fs, self._base = fsspec.url_to_fs(str(root), use_listings_cache=False)
            self.root: str | Path = str(root).rstrip("/")
        else:
            self.root = Path(root)

    def path(self, name: str) -> str | Path:
        return f"{self._base}/{name}" if self.is_url else self.root / name

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name)) if self.is_url else self.path(name).exists()

    def read(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(name)) if self.is_url else self.path(name).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{join(self.root, name)} does not exist") from None

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` if it does not exist yet; returns whether this call wrote it."""
        if not self.is_url:
            return atomic_create(self.path(name), lambda tmp: tmp.write_bytes(data))
        try:
            self.fs.pipe_file(self.path(name), data, mode="create")  # S3: PUT with If-None-Match: *
        except FileExistsError:
            return False
        return True

    def names(self, suffix: str) -> list[str]:
        """The stored documents' file names (`xx/<hash><suffix>`)."""
        if self.is_url:
            return [p[len(self._base) + 1 :] for p in self.fs.glob(f"{self._base}/*/*{suffix}")]
        return [str(p.relative_to(self.root)) for p in self.root.glob(f"*/*{suffix}")]


class AugmentationStore:
    def __init__(self, root: str | Path):
        self.location = Location(root)
        self.root = self.location.root

    @staticmethod
    def name(doc_id: str) -> str:
        return f"{doc_filename(doc_id)}.json"

    def has(self, doc_id: str) -> bool:
        return self.location.exists(self.name(doc_id))

    def get(self, doc_id: str) -> Augmentation:
        return Augmentation.from_dict(json.loads(self.location.read(self.name(doc_id))))

    def put(self, augmentation: Augmentation) -> bool:
        """Store `augmentation` unless one is stored for its document; returns whether it was written."""
        data = json.dumps(augmentation.to_dict(), ensure_ascii=False).encode()
        return self.location.create(self.name(augmentation.doc_id), data)

    def __iter__(self) -> Iterator[Augmentation]:
        for name in self.location.names(".json"):
            yield Augmentation.from_dict(json.loads(self.location.read(name)))


class AdapterStore:
    def __init__(self, root: str | Path, dtype: str = "bfloat16"):
        self.location = Location(root)
        self.root = self.location.root
        self.dtype = getattr(torch, dtype)

    @property
    def meta(self) -> dict:
        return json.loads(self.location.read("meta.json"))

    def put_meta(self, meta: dict) -> bool:
        """Record what builds this store's adapters (once: the key of the store already fixes it)."""
        return self.location.create("meta.json", json.dumps(meta, indent=2).encode())

    @staticmethod
    def name(doc_id: str) -> str:
        return f"{doc_filename(doc_id)}.safetensors"

    def path(self, doc_id: str) -> str | Path:
        return self.location.path(self.name(doc_id))

    def has(self, doc_id: str) -> bool:
        return self.location.exists(self.name(doc_id))

    def missing(self, doc_ids: list[str]) -> list[str]:
        """The ids without a stored adapter, in order (an object store is listed once for many ids)."""
        if not self.location.is_url or len(doc_ids) <= 256:
            return [d for d in doc_ids if not self.has(d)]
        stored = set(self.location.names(".safetensors"))
        return [d for d in doc_ids if self.name(d) not in stored]

    def put(self, doc_id: str, adapter: Adapter) -> bool:
        """Store a document's adapter unless one is stored already; returns whether this call wrote it."""
        tensors = {k: v.to(self.dtype).contiguous() for k, v in adapter.items()}
        metadata = {"doc_id": doc_id}
        if self.location.is_url:
            return self.location.create(self.name(doc_id), save(tensors, metadata=metadata))
        return atomic_create(self.path(doc_id), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def get(self, doc_id: str) -> Adapter:
        try:
            if self.location.is_url:
                return load(self.location.read(self.name(doc_id)))
            if self.path(doc_id).exists():
                return load_file(str(self.path(doc_id)))  # memory-mapped
        except FileNotFoundError:
            pass
        raise KeyError(f"no adapter stored for document {doc_id!r} in {self.root}")

    def count(self) -> int:
        return len(self.location.names(".safetensors"))


def export_peft(adapter: Adapter, out_dir: str | Path, meta: dict, base_model_path: str) -> Path:
    """Write `adapter` as a PEFT LoRA directory, loadable with `peft.PeftModel.from_pretrained`.

    `meta` carries the LoRA config; a merged adapter (several documents) exports with the summed rank
    and the same alpha/rank scale, so its delta is the exact sum of the documents' deltas.
    """
    from peft import LoraConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora = meta["lora"]
    name = lora["target_modules"][0]
    rank = adapter[f"{name}.A"].shape[1]
    # PEFT scales by alpha / r: keep each document's scale when the rank is a sum of several
    alpha = lora["alpha"] / lora["rank"] * rank
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(lora["target_modules"]),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path,
    )
    from .lora import BLOCKS

    tensors = {}
    for module in lora["target_modules"]:
        A, B = adapter[f"{module}.A"], adapter[f"{module}.B"]
        for layer in range(A.shape[0]):
            prefix = f"base_model.model.model.layers.{layer}.{BLOCKS.get(module, 'mlp')}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = A[layer].contiguous()
            tensors[f"{prefix}.lora_B.weight"] = B[layer].contiguous()
    config.save_pretrained(str(out))
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    return out
