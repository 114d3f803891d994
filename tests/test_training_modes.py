"""Each mode trains on a toy objective (in-process, tiny models); NaN handling; kill-and-resume exactness."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pisces_fast.training.config import load_config
from pisces_fast.training.trainer import Trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


def cfg_for(mode, tmp_path, **over):
    base = {"deepspeed": None, "output_dir": str(tmp_path / mode), "checkpoint_every": 0, "export_lora": False,
            "validation": {"every": 0}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(os.path.join(ROOT, "configs", f"tiny_{mode}.yaml"), base)


def losses(out_dir, key="loss"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [json.loads(line)[key] for line in fh]


def probe(tr, batch, key="loss", seeds=(11, 12, 13)):
    """The mode's objective on fixed (noise, t) draws: comparable before and after training."""
    vals = []
    state = torch.random.get_rng_state()
    with torch.no_grad():
        for seed in seeds:
            torch.manual_seed(seed)
            loss, m = tr.mode.loss(batch, 0)
            vals.append(float(loss) if key == "loss" else m[key])
    torch.random.set_rng_state(state)
    return sum(vals) / len(vals)


def test_cd_reward_objective_decreases(tmp_path):
    # Toy objective: L = 0.1 L_CD - R_semantic(one-step x0) on two fixed clips (toy colour reward).
    cfg = cfg_for("cd", tmp_path, max_steps=8, optim={"lr": 2e-2}, reward={"weights": {"semantic": 1.0, "quality": 0.0}},
                  cd={"cd_weight": 0.1}, model={"num_frames": 4}, data={"synthetic_size": 2, "batch_size": 2})
    tr = Trainer(cfg)
    batch = tr.dataset[0], tr.dataset[1]
    batch = {"video": torch.stack([b["video"] for b in batch]), "caption": [b["caption"] for b in batch]}
    before, sem_before = probe(tr, batch), probe(tr, batch, "reward/semantic")
    tr.train()
    after, sem_after = probe(tr, batch), probe(tr, batch, "reward/semantic")
    print(f"cd probe loss {before:.4f} -> {after:.4f}; semantic {sem_before:.4f} -> {sem_after:.4f}; per-step",
          [round(x, 4) for x in losses(cfg.output_dir)])
    assert after < before - 0.01 and sem_after > sem_before + 0.01


def test_grpo_surrogate_decreases_on_a_fixed_rollout(tmp_path):
    cfg = cfg_for("grpo", tmp_path, max_steps=1, grpo={"clip_range": 10.0, "kl_beta": 0.0, "cd_weight": 0.0},
                  optim={"lr": 1e-2, "max_grad_norm": 0.0}, reward={"weights": {"semantic": 1.0}})
    tr = Trainer(cfg)
    torch.manual_seed(0)
    ro = tr.mode.rollout(["a red square moving right"])
    assert ro["adv"].shape == (cfg.grpo.group_size,) and ro["adv"].abs().sum() > 0
    all_steps = list(range(cfg.grpo.num_sampling_steps))
    values = []
    for _ in range(6):
        loss, m = tr.mode.policy_loss(ro, all_steps)
        values.append(float(loss))
        tr.backend.backward(loss)
        tr.backend.micro_step(True)
    print("grpo surrogate", values)
    assert abs(values[0]) < 1e-5  # on-policy: ratio 1, advantages have zero mean
    assert values[-1] < values[0] - 1e-5 and all(b <= a + 1e-7 for a, b in zip(values, values[1:]))


def test_dpo_loss_decreases_on_fixed_pairs(tmp_path):
    """Toy objective: the DF-DPO loss of one (winner, noisy loser) pair at fixed noise and timesteps."""
    cfg = cfg_for("dpo", tmp_path, max_steps=1, optim={"lr": 2e-3},
                  dpo={"beta": 5000.0, "sft_weight": 0.1, "curriculum": [{"ops": ["noise"], "strength": 1.0}]},
                  data={"synthetic_size": 1}, model={"num_frames": 4})
    tr = Trainer(cfg)
    batch = {"video": tr.dataset[0]["video"][None].repeat(2, 1, 1, 1, 1), "caption": [tr.dataset[0]["caption"]] * 2}
    values, acc = [], []
    for _ in range(6):
        torch.manual_seed(20)  # same losers, noise and t every iteration
        loss, m = tr.mode.loss(batch, 0)
        values.append(m["loss_dpo"])
        acc.append(m["implicit_acc"])
        tr.backend.backward(loss)
        tr.backend.micro_step(True)
    print("dpo loss", [round(v, 4) for v in values], "implicit acc", acc)
    assert values[0] == pytest.approx(0.6931, abs=1e-3)  # LoRA B = 0 at start: policy == reference
    assert values[-1] < values[0] - 0.05 and acc[-1] == 1.0


class NaNAfterFirstCall(torch.nn.Module):
    calls = 0

    def forward(self, video, prompts):
        NaNAfterFirstCall.calls += 1
        r = video.mean(dim=(1, 2, 3, 4))
        return {"quality": r * float("nan") if NaNAfterFirstCall.calls > 1 else r, "semantic": r}


def nan_reward():
    NaNAfterFirstCall.calls = 0
    return NaNAfterFirstCall()


def test_nan_loss_stops_with_message_and_checkpoint(tmp_path):
    cfg = cfg_for("cd", tmp_path, max_steps=5, reward={"kind": "python:test_training_modes:nan_reward"})
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* step 2.*loss_reward=nan.*checkpoint-00000001"):
        train(cfg)
    state = json.load(open(os.path.join(cfg.output_dir, "checkpoints", "checkpoint-00000001", "trainer_state.json")))
    assert state["step"] == 1 and state["reason"] == "non-finite loss"


def _run(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)


def test_kill_and_resume_reproduces_uninterrupted_losses(tmp_path):
    common = ["--config", "configs/tiny_cd.yaml", "--deepspeed", "null", "--max_steps", "5", "--checkpoint_every", "2",
              "--validation.every", "0", "--export_lora", "false", "--data.batch_size", "1", "--model.num_frames", "4"]
    full, crashed = str(tmp_path / "full"), str(tmp_path / "crashed")
    r = _run(common + ["--output_dir", full])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(common + ["--output_dir", crashed], {"PISCES_FAST_CRASH_AFTER_STEP": "3"})
    assert r.returncode == 17, r.stderr[-2000:]  # killed after step 3; newest checkpoint is step 2
    assert len(losses(crashed)) == 3
    r = _run(common + ["--output_dir", crashed, "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(crashed) == losses(full)  # bitwise: LoRA, EMA, AdamW, LR schedule, RNG and data position restored
    assert losses(crashed, "reward/semantic") == losses(full, "reward/semantic")
    assert sorted(os.listdir(os.path.join(crashed, "checkpoints"))) == ["checkpoint-00000004", "checkpoint-00000005", "latest"]
