"""Command line: ``deepspeed tapo_ds/main.py --config configs/<name>.yaml [--set k.p=v ...] [--resume auto|PATH]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# DeepSpeed's one-time op builds land in the repo's ignored cache and are reused.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tapo_ds/main.py", description=__doc__)
    p.add_argument("--config", required=True, help="YAML file (may `include:` others)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML syntax), repeatable")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the run's latest checkpoint (auto) or a given one")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from tapo_ds import preflight
    from tapo_ds.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        preflight.check(cfg, args.resume)  # registry names, files, the run folder: before anything heavy
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    preflight.clear_run_dir(cfg, int(os.environ.get("RANK", "0")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tapo_ds.checkpoint import CheckpointError
    from tapo_ds.data import DataError
    from tapo_ds.engine import init_distributed
    from tapo_ds.stages import run_stage

    init_distributed()
    try:
        run_stage(cfg, args.resume)
    except ConfigError as exc:  # a setting that only the stage can check (e.g. against the rank count)
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError) as exc:
        # Bad input named by place (file:line, checkpoint path): one line, no traceback.
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
