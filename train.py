"""Post-train a text-to-video diffusion model with PISCES rewards, GRPO or DF-DPO.

    python train.py --config configs/tiny_cd.yaml [--key value ...]          # one process
    deepspeed --num_gpus 2 train.py --config configs/tiny_cd.yaml            # DeepSpeed ranks
    deepspeed train.py --config CONFIG.yaml --output_dir runs/x --resume latest

Overrides use dotted keys (`--optim.lr 1e-5`, `--cd.skip_k 5`); see pisces_fast/training/config.py.
"""
import sys

from pisces_fast.training.config import config_from_argv
from pisces_fast.training.trainer import train


def main(argv=None) -> dict:
    try:
        cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        sys.exit(f"train.py: {exc}")
    return train(cfg)


if __name__ == "__main__":
    main()
