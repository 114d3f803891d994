"""The embedded-world main job's configuration: ``TrainConfig`` plus a ``world:`` section.

``WorldTrainConfig`` is what ``deepspeed train.py`` with no ``--config`` builds (``WORLD_DEFAULTS`` <- command-line
overrides such as ``--max_steps 20`` or ``--world.eval_prompts 4``); the library's ``TrainConfig`` knows nothing
about the world.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from pisces_fast.training.config import TrainConfig, config_from_argv
from pisces_fast.training.sampling import SAMPLERS

from .assets import world_assets_dir

# The reward factory the main job trains with (a `python:module:factory` reward of the ordinary trainer).
WORLD_REWARD = "python:pisces_fast.world.job:world_reward"

# The evaluation grid. The teacher under DDIM 20 and the consistency ("stochastic multistep") sampler at 4/8 steps,
# each at CFG 1 and 3 ("before" is its best row by Total); DDIM 50 is in FULL_TEACHER_GRID, not the default: on
# this world it scores like DDIM 20 (README) and alone would cost 60 % of the teacher's sampling time, which the
# main job's 10-minute budget on 2 cores cannot hold. The student with its own sampler, the consistency sampler at
# 4/8 steps and guidance 1/3 ("after" is `world.student_row`), so every student row has a same-sampler teacher row;
# DDIM rows of a consistency-distilled student measure a sampler it was not trained for. `--world.teacher_grid` /
# `--world.student_grid` take any rows.
FULL_TEACHER_GRID = [
    {"sampler": s, "steps": n, "guidance": g}
    for s, n in (("ddim", 20), ("ddim", 50), ("consistency", 4), ("consistency", 8))
    for g in (1.0, 3.0)
]
DEFAULT_GRID = [dict(r) for r in FULL_TEACHER_GRID if r["steps"] != 50]
STUDENT_GRID = [dict(r) for r in DEFAULT_GRID if r["sampler"] == "consistency"]


def default_world_defaults() -> dict:
    """The main job's configuration when train.py gets no --config (every key can be overridden)."""
    return {
        "mode": "cd",
        "output_dir": "outputs/world",
        "max_steps": 120,
        "checkpoint_every": 40,
        "seed": 0,
        "model": {"path": str(world_assets_dir() / "generator"), "num_frames": 8, "height": 32, "width": 32,
                  "text_max_length": 20},
        "lora": {"rank": 8, "alpha": 8.0},
        "data": {"kind": "shapes", "batch_size": 4, "synthetic_size": 4096},
        "reward": {"kind": WORLD_REWARD, "weights": {"quality": 1.0, "semantic": 1.0}, "fusion": "equal"},
        "cd": {"num_ddim_timesteps": 50, "skip_k": 1, "guidance_scale_min": 1.0, "guidance_scale_max": 4.0,
               "guidance_conditioning": True, "ema_decay": 0.95, "reward_scale": 1.0, "cd_weight": 1.0},
        "optim": {"lr": 2e-4, "max_grad_norm": 1.0},
    }


WORLD_DEFAULTS = default_world_defaults()


@dataclass
class WorldJobConfig:
    """The embedded-world main job (``pisces_fast.world.job``): OT-map fit, the before/after evaluation grid."""

    # A saved world VLM directory; None = the one shipped with the package.
    vlm: Optional[str] = None
    # Algorithm 2 on the world: how many real train clips to embed, and the fit's budget.
    ot_map_clips: int = 1024
    ot_map_steps: int = 300
    ot_map_inner_steps: int = 5
    ot_map_lr: float = 1e-3
    ot_map_hidden: int = 128
    # Evaluation on held-out prompts: distinct prompts and sampling seeds (each seed fixes the initial latents and
    # the consistency sampler's fresh noise, identical for the teacher and the student).
    eval_prompts: int = 16
    eval_seeds: list = field(default_factory=lambda: [0, 1])
    eval_seed: int = 0
    # Rows {"sampler": "ddim"|"consistency", "steps": n, "guidance": w} each model is sampled with.
    teacher_grid: list = field(default_factory=lambda: [dict(r) for r in DEFAULT_GRID])
    student_grid: list = field(default_factory=lambda: [dict(r) for r in STUDENT_GRID])
    # The student's headline row ("after"): the consistency sampler at 4 steps with this guidance.
    student_row: dict = field(default_factory=lambda: {"sampler": "consistency", "steps": 4, "guidance": 3.0})


def check_grid_row(row, name: str) -> tuple:
    if not isinstance(row, dict) or set(row) != {"sampler", "steps", "guidance"}:
        raise ValueError(f"config `{name}`: expected {{sampler, steps, guidance}}, got {row!r}")
    if row["sampler"] not in SAMPLERS:
        raise ValueError(f"config `{name}.sampler`: expected one of {SAMPLERS}, got {row['sampler']!r}")
    if not isinstance(row["steps"], int) or isinstance(row["steps"], bool) or row["steps"] < 1:
        raise ValueError(f"config `{name}.steps`: expected an integer >= 1, got {row['steps']!r}")
    if not isinstance(row["guidance"], (int, float)) or isinstance(row["guidance"], bool) or row["guidance"] < 1:
        raise ValueError(f"config `{name}.guidance`: expected a number >= 1, got {row['guidance']!r}")
    return row["sampler"], int(row["steps"]), float(row["guidance"])


def parse_grid_row(text: str, name: str = "--sampler") -> dict:
    """"consistency:4:3" -> {"sampler": "consistency", "steps": 4, "guidance": 3.0} (checked as a grid row)."""
    parts = text.split(":") if isinstance(text, str) else []
    try:
        row = {"sampler": parts[0], "steps": int(parts[1]), "guidance": float(parts[2])}
    except (IndexError, ValueError):
        row = None
    if row is None or len(parts) != 3:  # "a:4:3:1" would otherwise pass as a:4:3
        raise ValueError(f"{name}: expected SAMPLER:STEPS:GUIDANCE (e.g. consistency:4:3), got {text!r}")
    check_grid_row(row, name)
    return row


def row_key(row: dict) -> tuple:
    """(sampler, steps, guidance) of a grid row, normalised (guidance as float)."""
    return row["sampler"], int(row["steps"]), float(row["guidance"])


@dataclass
class WorldTrainConfig(TrainConfig):
    world: WorldJobConfig = field(default_factory=WorldJobConfig)

    def validate(self) -> "WorldTrainConfig":
        super().validate()
        w = self.world

        def need(cond, name, expected, value):
            if not cond:
                raise ValueError(f"config `world.{name}`: expected {expected}, got {value!r}")

        for name in ("ot_map_clips", "ot_map_steps", "ot_map_inner_steps", "ot_map_hidden", "eval_prompts"):
            need(getattr(w, name) >= 1, name, "an integer >= 1", getattr(w, name))
        need(w.ot_map_lr > 0, "ot_map_lr", "a positive number", w.ot_map_lr)
        need(len(w.eval_seeds) >= 1 and all(isinstance(x, int) and not isinstance(x, bool) for x in w.eval_seeds),
             "eval_seeds", "a non-empty list of ints", w.eval_seeds)
        for grid in ("teacher_grid", "student_grid"):
            rows = getattr(w, grid)
            need(isinstance(rows, list) and len(rows) >= 1, grid, "a non-empty list of rows", rows)
            for i, row in enumerate(rows):
                check_grid_row(row, f"world.{grid}[{i}]")
        check_grid_row(w.student_row, "world.student_row")
        need(row_key(w.student_row) in {row_key(r) for r in w.student_grid}, "student_row",
             "one of the rows of world.student_grid", w.student_row)
        if w.vlm is not None and not os.path.isdir(self.resolve_path(w.vlm)):
            raise FileNotFoundError(f"config `world.vlm`: directory not found: {self.resolve_path(w.vlm)}")
        return self


def world_config_from_argv(argv: list) -> WorldTrainConfig:
    """``WORLD_DEFAULTS`` <- ``--key value`` overrides, validated (``--config`` is not for the world job)."""
    return config_from_argv(list(argv), defaults=WORLD_DEFAULTS, config_class=WorldTrainConfig)
