"""Export a checkpoint (ours, official, timm or transformers layout) to the official, timm or transformers layout.

    python scripts/export.py --checkpoint runs/sample_cpu/checkpoints/checkpoint_00000060 --format hf --output atto_hf
    python scripts/export.py --checkpoint convnextv2_atto_1k_224_fcmae.pt --format timm --output atto_timm
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import CheckpointError  # noqa: E402
from models.export import EXPORT_FORMATS, export_weights  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="weights file or checkpoint / transformers directory")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="layout to write")
    parser.add_argument("--output", required=True, help="file (official) or directory (timm, hf) to write")
    parser.add_argument("--conv-mlp", choices=("auto", "yes", "no"), default="auto",
                        help="timm only: 1x1-conv MLP weights (auto: as timm builds the size)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    conv_mlp = {"auto": None, "yes": True, "no": False}[args.conv_mlp]
    try:
        export_weights(args.checkpoint, args.format, args.output, conv_mlp=conv_mlp)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"export error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
