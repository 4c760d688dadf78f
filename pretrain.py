"""FCMAE pretraining: ``accelerate launch pretrain.py --config configs/pretrain/convnextv2_base.yaml data.path=DIR``.

Also runs as ``python pretrain.py ...`` on one device (a CPU is fine). See README "Pretraining".
"""

from fcmae.cli import pretrain_main

if __name__ == "__main__":
    pretrain_main()
