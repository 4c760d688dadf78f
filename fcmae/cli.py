"""Command-line entry points: ``--config FILE`` plus dotted ``key=value`` overrides."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fcmae.config import ConfigError


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file (deltas from the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.path=/data/images optim.blr=2e-4")
    return parser


def pretrain_main(argv: Sequence[str] | None = None) -> None:
    """``python pretrain.py --config configs/pretrain/convnextv2_base.yaml data.path=/data/images``.

    Exits with status 2 and a one-line ``config error: <key>: <problem>`` on a bad configuration,
    before any data or model is touched; status 1 when training stops on an error.
    """
    args = _parser("pretrain.py", "FCMAE pretraining of a ConvNeXt V2 encoder").parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages
    from fcmae.pretrain_config import load_pretrain_config

    try:
        cfg = load_pretrain_config(args.config, args.overrides)
        cfg.data.require_source()
    except ConfigError as e:
        _fail(f"config error: {e}", status=2)
    from fcmae.data import CorpusError
    from fcmae.engine import NonFiniteLossError, NonFiniteWeightsError
    from fcmae.pretraining import run_pretraining
    from fcmae.run_state import CheckpointWriteError, ResumeError

    try:
        run_pretraining(cfg)
    except ConfigError as e:
        _fail(f"config error: {e}", status=2)
    except ResumeError as e:
        _fail(f"resume error: {e}", status=2)
    except (NonFiniteLossError, NonFiniteWeightsError, CheckpointWriteError, CorpusError) as e:
        _fail(f"error: {e}", status=1)


def _fail(message: str, status: int) -> None:
    print(message, file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    pretrain_main()
