"""Finetuning: ``accelerate launch finetune.py --config configs/finetune/convnextv2_atto.yaml data.path=DIR
model.pretrained=runs/pretrain/weights/encoder.safetensors``.

Also runs as ``python finetune.py ...`` on one device (a CPU is fine). See README "Finetuning".
"""

from fcmae.finetune_cli import finetune_main

if __name__ == "__main__":
    finetune_main()
