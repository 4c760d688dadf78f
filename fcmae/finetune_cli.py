"""``finetune.py``: ``--config FILE`` plus dotted ``key=value`` overrides (the pretraining CLI's conventions)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from fcmae.config import ConfigError


def finetune_main(argv: Sequence[str] | None = None) -> None:
    """``accelerate launch finetune.py --config configs/finetune/convnextv2_atto.yaml data.path=DIR``.

    Exits with status 2 and a one-line ``config error: <key>: <problem>`` on a bad configuration,
    before any data or model is touched; status 1 when training stops on an error.
    """
    parser = argparse.ArgumentParser(prog="finetune.py", description="Finetune a ConvNeXt V2 classifier")
    parser.add_argument("--config", help="YAML file (deltas from the defaults), e.g. configs/finetune/<size>.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.path=/data/imagenet")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from fcmae.finetune_config import load_finetune_config

    try:
        cfg = load_finetune_config(args.config, args.overrides)
        cfg.data.require_source()
    except ConfigError as e:
        _fail(f"config error: {e}", status=2)
    from fcmae.engine import NonFiniteLossError
    from fcmae.finetuning import run_finetuning
    from fcmae.run_state import CheckpointWriteError, ResumeError
    from models.checkpoint import CheckpointError

    try:
        metrics = run_finetuning(cfg)
    except ConfigError as e:
        _fail(f"config error: {e}", status=2)
    except CheckpointError as e:
        _fail(f"checkpoint error: {e}", status=2)
    except ResumeError as e:
        _fail(f"resume error: {e}", status=2)
    except (NonFiniteLossError, CheckpointWriteError) as e:
        _fail(f"error: {e}", status=1)
    if cfg.train.eval_only:
        print(json.dumps(metrics["model"]))


def _fail(message: str, status: int) -> None:
    print(message, file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    finetune_main()
