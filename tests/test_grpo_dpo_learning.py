"""GRPO and DF-DPO on tiny models: the rollout's log-probs are the scheduler's transition density (only the
`grpo.sde_steps` are stochastic), the first PPO update is on-policy (ratios exactly 1, dropout included), advantages
belong to their samples' prompt groups, the reference stays frozen, and a short free-running GRPO run raises its
reward on held-out noise."""
import os

import pytest
import torch

from pisces_fast.training.config import load_config
from pisces_fast.training.lora import adapter_disabled
from pisces_fast.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def grpo_trainer(tmp_path, tiny="unet3d", **over):
    base = {"deepspeed": None, "output_dir": str(tmp_path / "grpo"), "checkpoint_every": 0, "export_lora": False,
            "validation": {"every": 0}, "model": {"tiny": tiny, "num_frames": 4, "height": 16, "width": 16},
            "reward": {"kind": "toy", "fusion": "equal", "weights": {"semantic": 1.0}, "num_frames": 4},
            "grpo": {"group_size": 4, "num_sampling_steps": 4, "timestep_fraction": 1.0, "cd_weight": 0.0,
                     "kl_beta": 0.0, "clip_range": 1e-4}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_grpo.yaml"), base)
    tr = Trainer(cfg)
    tr.gen.denoiser.train()  # as inside Trainer.train(): UNet3D's dropout layers are active
    return tr


def test_rollout_logprobs_are_ddim_transition_densities(tmp_path):
    """Each stored log-prob = log N(x_{i+1}; mean, std^2) with mean/std from diffusers' DDIMScheduler (eta > 0)."""
    from diffusers import DDIMScheduler

    tr = grpo_trainer(tmp_path, grpo={"eta": 0.8})
    m, g = tr.mode, tr.cfg.grpo
    torch.manual_seed(0)
    ro = m.rollout(["a shape moving right", "a shape moving left"])
    s = DDIMScheduler.from_config(tr.gen.scheduler.config)
    s.set_timesteps(g.num_sampling_steps)
    assert torch.equal(s.timesteps.long(), m.ts.long().cpu())
    tr.gen.denoiser.eval()
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            x = ro["traj"][i]
            eps = m._predict(x, i, ro["cond"], ro["uncond"])
            mean = s.step(eps, t, x, eta=g.eta, variance_noise=torch.zeros_like(x)).prev_sample
            prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
            std = g.eta * s._get_variance(t, prev_t).sqrt()
            ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(ro["traj"][i + 1].double())
            torch.testing.assert_close(ro["logp_old"][i].double(), ref.flatten(1).mean(1), rtol=1e-5, atol=1e-5)


def test_sde_steps_are_the_only_stochastic_and_trained_steps(tmp_path):
    """grpo.sde_steps = 2 of 4: steps 0-1 are DDIM eta > 0 draws with their densities, steps 2-3 are diffusers'
    deterministic DDIM step (eta = 0) of the stored latents; only the stochastic steps carry a log-prob."""
    from diffusers import DDIMScheduler

    tr = grpo_trainer(tmp_path, grpo={"eta": 1.0, "sde_steps": 2})
    m, g = tr.mode, tr.cfg.grpo
    torch.manual_seed(0)
    ro = m.rollout(["a shape moving right"])
    assert len(ro["logp_old"]) == 2 and len(ro["traj"]) == 5
    s = DDIMScheduler.from_config(tr.gen.scheduler.config)
    s.set_timesteps(g.num_sampling_steps)
    tr.gen.denoiser.eval()
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            x = ro["traj"][i]
            eps = m._predict(x, i, ro["cond"], ro["uncond"])
            if i < 2:
                mean = s.step(eps, t, x, eta=g.eta, variance_noise=torch.zeros_like(x)).prev_sample
                std = g.eta * s._get_variance(t, t - s.config.num_train_timesteps // s.num_inference_steps).sqrt()
                ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(ro["traj"][i + 1].double())
                torch.testing.assert_close(ro["logp_old"][i].double(), ref.flatten(1).mean(1), rtol=1e-5, atol=1e-5)
            else:
                torch.testing.assert_close(ro["traj"][i + 1], s.step(eps, t, x, eta=0.0).prev_sample,
                                           rtol=1e-5, atol=1e-5)
    _, metrics = m.policy_loss(ro)  # trains on the stochastic steps only (an index >= 2 would fail)
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0
    with pytest.raises(ValueError, match="grpo.sde_steps"):
        grpo_trainer(tmp_path, grpo={"sde_steps": 5})


def test_first_update_is_on_policy_and_advantages_follow_their_groups(tmp_path):
    tr = grpo_trainer(tmp_path)
    m = tr.mode
    torch.manual_seed(1)
    prompts = ["a shape moving right", "a red shape moving left"]
    ro = m.rollout(prompts)
    # Advantages: the samples' own rewards, normalised inside their prompt's group of G (group-major layout).
    video = tr.gen.decode_latents(ro["traj"][-1], tr.cfg.reward.num_frames)
    r = tr.reward(video, ro["prompts"])["semantic"].view(2, -1)
    assert ro["prompts"] == [p for p in prompts for _ in range(4)]
    expected = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-6)
    torch.testing.assert_close(ro["adv"], expected.flatten(), rtol=1e-4, atol=1e-4)
    # On-policy (dropout active in train mode): every ratio is exactly 1, nothing is clipped, and the clipped
    # objective's gradient equals the unclipped -A * rho one.
    loss, metrics = m.policy_loss(ro)
    assert metrics["ratio_min"] == 1.0 and metrics["ratio_max"] == 1.0 and metrics["clipfrac"] == 0.0
    assert metrics["approx_kl"] == 0.0
    assert tr.gen.denoiser.training  # restored after the dropout-free evaluation


def test_reference_is_frozen_and_kl_grows_after_a_step(tmp_path):
    tr = grpo_trainer(tmp_path, grpo={"kl_beta": 0.1}, optim={"lr": 5e-2, "max_grad_norm": 0.0},
                      lora={"init": "gaussian"})
    m = tr.mode
    torch.manual_seed(2)
    ro = m.rollout(["a shape moving right"])
    x, cond = ro["traj"][1], ro["cond"]

    def predict(ref: bool):
        tr.gen.denoiser.eval()
        with torch.no_grad():
            if ref:
                with adapter_disabled(tr.gen.denoiser):
                    return m._predict(x, 1, cond, ro["uncond"]).clone()
            return m._predict(x, 1, cond, ro["uncond"]).clone()

    ref_before, pol_before = predict(True), predict(False)
    for _ in range(2):
        loss, metrics = m.policy_loss(ro)
        tr.backend.backward(loss)
        tr.backend.micro_step(True)
    assert torch.equal(predict(True), ref_before)  # adapter disabled = the frozen base model
    assert not torch.allclose(predict(False), pol_before)
    _, metrics = m.policy_loss(ro)
    assert metrics["kl"] > 0 and metrics["ratio_max"] != 1.0  # the reused rollout is now off-policy


def test_reused_rollout_is_importance_weighted_and_clipped(tmp_path):
    tr = grpo_trainer(tmp_path, max_steps=3, grpo={"updates_per_rollout": 3, "clip_range": 1e-3},
                      optim={"lr": 5e-2, "max_grad_norm": 0.0}, data={"batch_size": 1, "synthetic_size": 1})
    tr.train()
    import json

    with open(os.path.join(tr.cfg.output_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert rows[0]["ratio_min"] == rows[0]["ratio_max"] == 1.0
    assert rows[1]["ratio_max"] != 1.0 or rows[1]["ratio_min"] != 1.0
    assert rows[1]["reward_mean"] == rows[0]["reward_mean"] == rows[2]["reward_mean"]  # the same samples
    for key in ("clipfrac", "approx_kl", "advantage_std", "reward_std", "ratio_mean"):
        assert key in rows[-1]
    assert os.path.isfile(os.path.join(tr.cfg.output_dir, "curves.png"))


def test_grpo_raises_brightness_on_held_out_noise(tmp_path):
    """Toy reward with an obvious optimum: closeness of every frame to white (the prompt names no colour), measured
    with fixed noise seeds that training never samples (G SDE samples each, the objective GRPO optimises). DDIM at
    3 steps (t = 667, 334, 1), only the first stochastic and trained (grpo.sde_steps = 1): measured 0.7609 -> 0.8216
    in 6 steps; with every step stochastic and trained (sde_steps 0) the same run gave 0.7611 -> 0.7897."""
    tr = grpo_trainer(tmp_path, seed=3, optim={"lr": 3e-2, "max_grad_norm": 1.0},
                      grpo={"group_size": 8, "num_sampling_steps": 3, "sde_steps": 1, "clip_range": 1e-3,
                            "shared_noise": True})
    prompt = ["a thing moving"]

    def held_out():
        return sum(tr.mode.evaluate(prompt, s)["reward_mean"] for s in (100, 101)) / 2

    before = held_out()
    for step in range(6):
        loss, _ = tr.mode.loss({"caption": prompt}, step)
        tr.backend.backward(loss)
        tr.backend.micro_step(True)
    after = held_out()
    print(f"held-out brightness reward {before:.4f} -> {after:.4f}")
    assert after > before + 0.03


def test_dpo_held_out_pairs_start_at_chance_and_separate_after_training(tmp_path):
    """Held-out (real, distorted) pairs with fixed noise: policy == reference at LoRA init (every implicit reward is
    a tie: accuracy 1/2, loss ln 2); a few DF-DPO steps on other clips move the held-out loss below ln 2."""
    import math

    cfg = load_config(os.path.join(ROOT, "configs", "tiny_dpo.yaml"),
                      {"deepspeed": None, "output_dir": str(tmp_path / "dpo"), "checkpoint_every": 0,
                       "export_lora": False, "validation": {"every": 0}, "max_steps": 6, "model": {"num_frames": 4},
                       "optim": {"lr": 2e-3}, "data": {"synthetic_size": 4, "batch_size": 2},
                       "dpo": {"beta": 5000.0, "sft_weight": 0.1, "curriculum": [{"ops": ["noise"], "strength": 1.0}]}})
    tr = Trainer(cfg)
    from pisces_fast.data.video_dataset import SyntheticVideoDataset

    other = SyntheticVideoDataset(2, 4, 16, 16, seed=99)  # clips training never sees
    videos = torch.stack([other[i]["video"] for i in range(2)])
    pairs = tr.mode.heldout_pairs(videos, ["a red square moving right", "a blue square moving left"], ["noise"], 1.0,
                                  seed=5, noise_per_pair=2)
    again = tr.mode.heldout_pairs(videos, ["a red square moving right", "a blue square moving left"], ["noise"], 1.0,
                                  seed=5, noise_per_pair=2)
    assert torch.equal(pairs["noise"]["lose"], again["noise"]["lose"]) and torch.equal(pairs["noise"]["t"], again["noise"]["t"])
    before = tr.mode.evaluate(pairs)
    assert before["acc/noise"] == 0.5 and before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    tr.train()
    after = tr.mode.evaluate(pairs)
    print("held-out DPO", before, "->", after)
    assert after["loss"] < math.log(2) and after["acc"] > 0.5
