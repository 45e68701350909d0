"""The workspace on disk: index, augmentations and adapters, keyed by what built them.

    HOME/
      config.json                       the config the workspace was last used with
      index/                            the retriever (see retrieval/)
      augment/<key>/<xx>/<hash>.json    one document's rewrites and QA pairs
      adapters/<key>/<xx>/<hash>.safetensors   one document's LoRA (stacked A/B per module)
      adapters/<key>/meta.json          model, LoRA and training config of this store

A document's files are found from its id alone (a hash names them), so lookup
is O(1) and needs no catalog to stay in sync. Every file is written to a
temporary name in the same directory and renamed into place, so a crash leaves
either the whole file or nothing, and a rerun simply skips what exists.
Adapters are loaded with safetensors, which memory-maps the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, atomic_write_text
from .augment import Augmentation
from .lora import Adapter


def doc_filename(doc_id: str) -> str:
    digest = hashlib.sha1(doc_id.encode()).hexdigest()
    return f"{digest[:2]}/{digest}"


class AugmentationStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, doc_id: str) -> Path:
        return self.root / f"{doc_filename(doc_id)}.json"

    def has(self, doc_id: str) -> bool:
        return self.path(doc_id).exists()

    def get(self, doc_id: str) -> Augmentation:
        return Augmentation.from_dict(json.loads(self.path(doc_id).read_text()))

    def put(self, augmentation: Augmentation) -> None:
        atomic_write_text(self.path(augmentation.doc_id), json.dumps(augmentation.to_dict(), ensure_ascii=False))


class AdapterStore:
    def __init__(self, root: Path, dtype: str = "bfloat16"):
        self.root = Path(root)
        self.dtype = getattr(torch, dtype)

    @property
    def meta(self) -> dict:
        return json.loads((self.root / "meta.json").read_text())

    def path(self, doc_id: str) -> Path:
        return self.root / f"{doc_filename(doc_id)}.safetensors"

    def has(self, doc_id: str) -> bool:
        return self.path(doc_id).exists()

    def put(self, doc_id: str, adapter: Adapter) -> None:
        tensors = {k: v.to(self.dtype).contiguous() for k, v in adapter.items()}
        atomic_write(self.path(doc_id), lambda tmp: save_file(tensors, str(tmp), metadata={"doc_id": doc_id}))

    def get(self, doc_id: str) -> Adapter:
        path = self.path(doc_id)
        if not path.exists():
            raise KeyError(f"no adapter stored for document {doc_id!r} in {self.root}")
        return load_file(str(path))

    def count(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.safetensors"))


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
            prefix = f"base_model.model.model.layers.{layer}.{BLOCKS[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = A[layer].contiguous()
            tensors[f"{prefix}.lora_B.weight"] = B[layer].contiguous()
    config.save_pretrained(str(out))
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    return out
