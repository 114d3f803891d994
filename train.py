"""Post-train a text-to-video diffusion model with PISCES rewards, GRPO or DF-DPO.

    deepspeed train.py                                                      # the main job on the embedded world
    python train.py --config configs/tiny_cd.yaml [--key value ...]          # one process
    deepspeed --num_gpus 2 train.py --config configs/tiny_cd.yaml            # DeepSpeed ranks
    deepspeed train.py --config CONFIG.yaml --output_dir runs/x --resume latest
    python train.py --config configs/recipes/modelscope_pisces_cd.yaml --dry_run [--dry_run_gpus 8]    # memory plan

With no --config, train.py runs the embedded-world job (pisces_fast/world/job.py): fit the
OT map, post-train the shipped generator with PISCES, and report before/after on held-out prompts.
Overrides use dotted keys (`--optim.lr 1e-5`, `--cd.skip_k 5`); see pisces_fast/training/config.py.
"""
import os
import sys

# OpenMP threads waiting at a barrier sleep instead of spinning: on cores shared with other work (CI, other jobs,
# several DeepSpeed ranks on one machine) a spinning thread burns the time slice its descheduled peer needs; the
# main job's CD step on 2 loaded cores took ~7x longer with libgomp's default (benchmarks/RESULTS.md, "Profile of
# the main job's training step"). libgomp reads this once, when torch loads: set it before the first `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pisces_fast.training.config import config_from_argv, config_help, parse_overrides  # noqa: E402

# Bad input (config, data, checkpoint files) and a diverged run end with one line naming the file or field and
# exit code 2 (PISCES_FAST_TRACEBACK=1 shows the traceback instead); anything else keeps its traceback.
EXIT_BAD_INPUT = 2


def fail(exc: BaseException, hint: str = "") -> None:
    if os.environ.get("PISCES_FAST_TRACEBACK") == "1":
        raise exc
    message = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
    print(f"train.py: {message}{hint}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `--dry_run` is a bare flag (every other option takes a value): build on the meta device, print the memory plan.
    argv = [a for i, a in enumerate(argv) for a in ((a, "true") if a == "--dry_run" and (
        i + 1 == len(argv) or argv[i + 1].startswith("--")) else (a,))]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\n" + config_help())
        sys.exit(0)
    config_path = None
    try:
        config_path, _ = parse_overrides(argv)
        if config_path is None:
            from pisces_fast.world import world_config_from_argv

            cfg = world_config_from_argv(argv)
        else:
            cfg = config_from_argv(argv)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        hint = ""
        if config_path is None and isinstance(exc, FileNotFoundError):
            hint = ("\n(the embedded-world job needs the world models in pisces_fast/assets/world/; make them with "
                    "`python scripts/pretrain_world_vlm.py --out pisces_fast/assets/world/vlm` and "
                    "`python scripts/pretrain_world_generator.py --vlm pisces_fast/assets/world/vlm --out pisces_fast/assets/world/generator`, "
                    "or pass --config for another job)")
        fail(exc, hint)
    from pisces_fast.training.checkpoint import CheckpointError

    try:
        if cfg.dry_run:
            from pisces_fast.training.memory_plan import dry_run

            return {"memory_plan": dry_run(cfg)}
        if config_path is None:
            from pisces_fast.world import run_world_job

            return run_world_job(cfg)
        from pisces_fast.training.trainer import train

        return train(cfg)
    except (CheckpointError, ValueError, FileNotFoundError, FloatingPointError) as exc:
        fail(exc)


if __name__ == "__main__":
    main()
