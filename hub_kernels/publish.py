#!/usr/bin/env python3
"""Upload a built variant tree to a Hugging Face kernel repository, where ``kernels.get_kernel``
finds it.

    python hub_kernels/publish.py out/hub-variants/build --dry-run      # what would be uploaded
    HF_TOKEN=... python hub_kernels/publish.py out/hub-variants/build   # upload

The repository (``[general.hub] repo-id`` of build.toml unless ``--repo-id``) is a ``kernel``-type
repository. ``kernels`` 0.17 resolves ``get_kernel(repo, version=N)`` to the branch ``vN``
(``kernels._versions``: branches named ``v<int>``), lists ``build/<variant>/`` there, picks the
variant of the running torch and imports ``build/<variant>/<package>/__init__.py``. So the upload
is: the repository (created if missing), the branch ``v<version>`` (``[general] version``), and one
commit to it holding ``build/<variant>/...`` for every variant of the tree plus the card
(README.md); files of those variants from an earlier upload are deleted in the same commit, other
variants stay. Only variants whose record says they passed kernel-abi-check are uploaded, unless
``--unchecked``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"stem_hub_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(f"stem_hub_{name}", mod)
    spec.loader.exec_module(mod)
    return mod


build = _load("build")

IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def variants_of(tree: Path) -> list[Path]:
    """The variant directories of a build tree (those holding metadata.json), by name."""
    tree = Path(tree)
    if not tree.is_dir():
        raise FileNotFoundError(f"{tree} is not a directory: pass the build tree (…/build) of build.py or variants.py")
    found = sorted(p for p in tree.iterdir() if p.is_dir() and (p / "metadata.json").exists())
    if not found:
        raise FileNotFoundError(f"no variant directories (with metadata.json) in {tree}")
    try:
        from kernels.variants import parse_variant
    except ImportError:  # kernels not installed: the name is checked when kernels loads it
        return found
    for p in found:
        try:
            parse_variant(p.name)
        except Exception as e:
            raise ValueError(f"{p.name} is not a build variant name kernels accepts: {e}") from e
    return found


def card(toml: dict, variants: list[Path], records: dict[str, dict]) -> str:
    g = toml["general"]
    repo = g.get("hub", {}).get("repo-id", g["name"])
    rows = []
    for v in variants:
        meta = json.loads((v / "metadata.json").read_text())
        rec = records.get(v.name, {})
        rows.append(f"| `{v.name}` | {', '.join(meta.get('backend', {}).get('archs', []))} | "
                    f"{rec.get('abi_check', 'not recorded')} |")
    return "\n".join([
        "---", f"license: {g['license'].lower()}", "tags:", "- kernels", "---", "",
        f"# {g['name']}", "",
        "Block-sparse flash attention for stem `BlockPlan`s (sm80 `mma.sync` kernel; sm90a `wgmma` + TMA kernel).",
        "", "```python", "from kernels import get_kernel", "",
        f'kernel = get_kernel("{repo}", version={g["version"]})',
        "out, lse = kernel.block_sparse_attn_fwd(q, k, v, kv_counts, kv_indices, block_size, q_offset, scale, True)",
        "```", "",
        "| variant | CUDA capabilities | kernel-abi-check |", "|---|---|---|",
        *rows, "",
    ])


def stage(tree: Path, dest: Path, *, records: dict[str, dict] | None = None, unchecked: bool = False,
          toml: dict | None = None) -> tuple[Path, list[str]]:
    """Lay out the upload in ``dest``: ``build/<variant>/...`` and README.md. Returns (dest, variant
    names). Variants without a passing check in ``records`` are refused unless ``unchecked``."""
    toml = toml or build.read_build_toml()
    records = records or {}
    variants = variants_of(tree)
    if not unchecked:
        bad = [v.name for v in variants if records.get(v.name, {}).get("abi_check") != "pass"]
        if bad:
            raise ValueError(f"no passing kernel-abi-check recorded for {', '.join(bad)}: run "
                             "`python hub_kernels/variants.py build --record FILE` and pass --record FILE, "
                             "or --unchecked to upload anyway")
    pkg = build.python_name(toml)
    for v in variants:
        if not (v / pkg / "__init__.py").exists() and not (v / "__init__.py").exists():
            raise FileNotFoundError(f"{v} has no {pkg}/__init__.py: not a build of this kernel")
        shutil.copytree(v, dest / "build" / v.name, ignore=IGNORE)
    (dest / "README.md").write_text(card(toml, variants, records))
    return dest, [v.name for v in variants]


def plan(repo_id: str, version: int, variants: list[str]) -> dict:
    """The Hub operations of an upload, in order."""
    branch = f"v{version}"
    return {
        "create_repo": {"repo_id": repo_id, "repo_type": "kernel", "exist_ok": True},
        "create_branch": {"repo_id": repo_id, "repo_type": "kernel", "branch": branch, "exist_ok": True},
        "upload_folder": {"repo_id": repo_id, "repo_type": "kernel", "revision": branch,
                          "delete_patterns": [f"build/{v}/**" for v in variants],
                          "commit_message": f"stem-attention v{version}: {len(variants)} build variants"},
    }


def publish(tree: Path, *, repo_id: str | None = None, dry_run: bool = False, records: dict | None = None,
            unchecked: bool = False, api=None, out=print) -> dict:
    """Upload ``tree`` (or with ``dry_run`` print what would be uploaded). ``api`` is a
    ``huggingface_hub.HfApi`` (made here when None). Returns the plan."""
    toml = build.read_build_toml()
    repo_id = repo_id or toml["general"].get("hub", {}).get("repo-id")
    if not repo_id or repo_id.count("/") != 1:
        raise ValueError(f"repo id {repo_id!r}: expected 'org/name' (--repo-id, or [general.hub] repo-id of "
                         "build.toml)")
    version = int(toml["general"]["version"])
    with tempfile.TemporaryDirectory(prefix="stem-hub-upload-") as tmp:
        staged, names = stage(tree, Path(tmp), records=records, unchecked=unchecked, toml=toml)
        ops = plan(repo_id, version, names)
        files = sorted(p for p in staged.rglob("*") if p.is_file())
        out(f"repository {repo_id} (type kernel), branch v{version}: {len(names)} variants, {len(files)} files")
        for f in files:
            out(f"  {f.relative_to(staged).as_posix()}  ({f.stat().st_size} bytes)")
        if dry_run:
            for name, kwargs in ops.items():
                out(f"would call HfApi.{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
            return ops
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        api.create_repo(**ops["create_repo"])
        api.create_branch(**ops["create_branch"])
        api.upload_folder(folder_path=str(staged), **ops["upload_folder"])
        out(f"uploaded: get_kernel({repo_id!r}, version={version})")
    return ops


def _records(path: Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    doc = json.loads(Path(path).read_text())
    rows = doc["variants"] if isinstance(doc, dict) else doc
    return {r["variant"]: r for r in rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tree", type=Path, help="build tree: the directory holding <variant>/ directories")
    ap.add_argument("--repo-id", default=None, help="org/name (default: [general.hub] repo-id of build.toml)")
    ap.add_argument("--record", type=Path, default=None,
                    help="variants record (JSON, from variants.py build --record): the ABI check results")
    ap.add_argument("--unchecked", action="store_true", help="upload variants without a passing check too")
    ap.add_argument("--dry-run", action="store_true", help="print what would be uploaded, upload nothing")
    args = ap.parse_args(argv)
    publish(args.tree, repo_id=args.repo_id, dry_run=args.dry_run, records=_records(args.record),
            unchecked=args.unchecked)
    return 0


if __name__ == "__main__":
    sys.exit(main())
