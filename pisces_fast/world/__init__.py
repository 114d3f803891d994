"""The embedded shapes world: its shipped models, the main job and its configuration.

A wing on top of the library (it uses ``pisces_fast.training``, ``rewards``, ``eval`` and ``data``; nothing imports
it). ``deepspeed train.py`` with no ``--config`` runs :func:`run_world_job` on :data:`WORLD_DEFAULTS`.
"""
from .assets import (
    load_world_generator,
    load_world_vlm,
    world_assets_dir,
    world_generator_meta,
    world_generator_path,
    world_vlm_path,
)
from .config import WORLD_DEFAULTS, WORLD_REWARD, WorldJobConfig, WorldTrainConfig, world_config_from_argv
from .job import run_world_job, world_reward

__all__ = [
    "load_world_generator", "load_world_vlm", "world_assets_dir", "world_generator_meta", "world_generator_path",
    "world_vlm_path", "WORLD_DEFAULTS", "WORLD_REWARD", "WorldJobConfig", "WorldTrainConfig",
    "world_config_from_argv", "run_world_job", "world_reward",
]
