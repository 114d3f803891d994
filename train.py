"""Post-train a text-to-video diffusion model with PISCES rewards, GRPO or DF-DPO.

    deepspeed train.py                                                      # the main job on the embedded world
    python train.py --config configs/tiny_cd.yaml [--key value ...]          # one process
    deepspeed --num_gpus 2 train.py --config configs/tiny_cd.yaml            # DeepSpeed ranks
    deepspeed train.py --config CONFIG.yaml --output_dir runs/x --resume latest

With no --config, train.py runs the embedded-world job (pisces_fast/training/world_job.py): fit the
OT map, post-train the shipped generator with PISCES, and report before/after on held-out prompts.
Overrides use dotted keys (`--optim.lr 1e-5`, `--cd.skip_k 5`); see pisces_fast/training/config.py.
"""
import sys

from pisces_fast.training.config import config_from_argv, parse_overrides


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    config_path = None
    try:
        config_path, _ = parse_overrides(argv)
        defaults = None
        if config_path is None:
            from pisces_fast.training.world_job import WORLD_DEFAULTS

            defaults = WORLD_DEFAULTS
        cfg = config_from_argv(argv, defaults=defaults)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        hint = ""
        if config_path is None and isinstance(exc, FileNotFoundError):
            hint = ("\n(the embedded-world job needs the world models in pisces_fast/assets/world/; make them with "
                    "`python scripts/pretrain_world_vlm.py --out pisces_fast/assets/world/vlm` and "
                    "`python scripts/pretrain_world_generator.py --vlm pisces_fast/assets/world/vlm --out pisces_fast/assets/world/generator`, "
                    "or pass --config for another job)")
        sys.exit(f"train.py: {exc}{hint}")
    if cfg.world.enabled:
        from pisces_fast.training.world_job import run_world_job

        return run_world_job(cfg)
    from pisces_fast.training.trainer import train

    return train(cfg)


if __name__ == "__main__":
    main()
