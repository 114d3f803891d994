"""Where a training step of the main job (the embedded world's PISCES CD run) spends its time, on CPU.

Builds the trainer exactly as ``pisces_fast.world.job.run_world_job`` does (world defaults, OT map fitted on the
world, the world VLM's quality + semantic rewards, LoRA + EMA, guidance conditioning), runs a few CD steps under
``torch.profiler`` and splits each step into:

* forward pieces, each a labelled range: text encoder, VAE encode of the real clip, generator (denoiser)
  forward — the student, the teacher and the EMA target calls —, VAE decode of the student's x0, the reward's
  text/video backbone, its quality head (OT map) and semantic head (ITM with OT attention);
* ``ot_attention`` / ``sinkhorn`` (the custom ops, forward and backward, wherever they run);
* backward, attributed to the forward range whose ops created each autograd node (sequence numbers);
* optimizer step (+ DeepSpeed's engine step with ``--deepspeed``) and the EMA update.

    python benchmarks/profile_train_step.py [--steps 4] [--threads 2] [--deepspeed configs/ds_zero2.json]

Prints a table (ms per step and % of the step), writes ``benchmarks/results/profile_train_step.csv`` and a Chrome
trace (``--trace``). Steps per second are measured without the profiler, on the same trainer.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _harness import RESULTS_DIR, device_name, git_commit  # noqa: E402

LABEL = "step/"  # prefix of our record_function ranges


def _wrap(obj, attr: str, label: str):
    """obj.attr(...) runs inside record_function(LABEL + label)."""
    fn = getattr(obj, attr)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(LABEL + label):
            return fn(*args, **kwargs)

    setattr(obj, attr, wrapped)


def build_trainer(args, out_dir: str):
    from pisces_fast.world.config import WORLD_REWARD, world_config_from_argv
    from pisces_fast.world.job import fit_world_ot_map
    from pisces_fast.training.trainer import Trainer

    argv = ["--output_dir", out_dir, "--max_steps", str(10**6), "--checkpoint_every", "0",
            "--world.ot_map_clips", "128", "--world.ot_map_steps", "20"]
    if args.deepspeed:
        argv += ["--deepspeed", args.deepspeed]
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", "29517")):
            os.environ.setdefault(k, v)
    cfg = world_config_from_argv(argv + list(args.override))
    kwargs = dict(cfg.reward.kwargs)
    if cfg.reward.kind == WORLD_REWARD and kwargs.get("use_ot_map", True):
        kwargs.setdefault("ot_map", fit_world_ot_map(cfg, os.path.join(out_dir, "ot_map")))
    cfg.reward.kwargs = kwargs
    return Trainer(cfg)


def instrument(trainer):
    """Label the pieces of a step (instance attributes only: nothing else in the process changes)."""
    import pisces_fast.rewards.pisces_rewards as pr

    gen = trainer.gen
    _wrap(gen, "encode_text", "text encoder")
    _wrap(gen, "encode_video", "VAE encode")
    _wrap(gen, "decode_latents", "VAE decode")
    _wrap(gen.denoiser, "forward", "generator forward")
    reward = trainer.reward
    if reward is not None and hasattr(reward, "backbone"):
        _wrap(reward.backbone, "encode_text", "reward text backbone")
        _wrap(reward.backbone, "encode_video", "reward video backbone")
        _wrap(pr, "quality_reward", "reward quality head (OT map)")
        _wrap(pr, "semantic_reward", "reward semantic head (ITM + OT attention)")
    _wrap(trainer.mode, "after_optimizer_step", "EMA update")


def one_step(trainer, step: int):
    """The body of Trainer.train's loop for one optimizer step (grad_accum = 1)."""
    batch = next(trainer.batches)
    with torch.profiler.record_function(LABEL + "loss (forward)"):
        loss, _ = trainer.mode.loss(batch, step)
    with torch.profiler.record_function(LABEL + "backward"):
        trainer.backend.backward(loss)
    with torch.profiler.record_function(LABEL + "optimizer step" + (" (DeepSpeed)" if trainer.cfg.deepspeed else "")):
        trainer.backend.micro_step(boundary=True)
    trainer.mode.after_optimizer_step()


def attribute(events, steps: int):
    """ms per step: labelled forward ranges (innermost wins), backward split by the forward label of each
    autograd node, custom OT ops, and the rest."""
    ranges = [e for e in events if e.name.startswith(LABEL)]
    fwd_labels = [e for e in ranges if e.name not in (LABEL + "loss (forward)", LABEL + "backward")]
    by_thread = defaultdict(list)
    for r in fwd_labels:
        by_thread[r.thread].append(r)

    def label_at(ev):
        best = None
        for r in by_thread.get(ev.thread, ()):
            if r.time_range.start <= ev.time_range.start and ev.time_range.end <= r.time_range.end:
                if best is None or r.time_range.start >= best.time_range.start:
                    best = r
        return best.name[len(LABEL):] if best is not None else "other forward (losses, noise, schedules)"

    seq_label = {}
    for ev in events:
        if ev.sequence_nr is not None and ev.sequence_nr >= 0 and not ev.name.startswith("autograd::engine"):
            if ev.name.startswith(LABEL) or ev.sequence_nr in seq_label:
                continue
            seq_label[ev.sequence_nr] = label_at(ev)
    out = defaultdict(float)
    # Self-exclusive forward: a label's time minus its labelled children.
    children = defaultdict(float)
    for r in fwd_labels:
        parent = None
        for p in by_thread[r.thread]:
            if p is not r and p.time_range.start <= r.time_range.start and r.time_range.end <= p.time_range.end:
                if parent is None or p.time_range.start >= parent.time_range.start:
                    parent = p
        if parent is not None:
            children[id(parent)] += r.cpu_time_total
    for r in fwd_labels:
        name = r.name[len(LABEL):]
        kind = "" if name.startswith("optimizer") or name == "EMA update" else "fwd: "
        out[kind + name] += (r.cpu_time_total - children[id(r)]) / 1e3 / steps
    loss_total = sum(r.cpu_time_total for r in ranges if r.name == LABEL + "loss (forward)") / 1e3 / steps
    labelled_fwd = sum(v for k, v in out.items() if k.startswith("fwd: "))
    out["fwd: other (losses, noise, schedules, fusion)"] = max(0.0, loss_total - labelled_fwd)
    bwd_total = sum(r.cpu_time_total for r in ranges if r.name == LABEL + "backward") / 1e3 / steps
    attributed = 0.0
    for ev in events:
        if ev.name.startswith("autograd::engine::evaluate_function:"):
            lab = seq_label.get(ev.sequence_nr, "other forward (losses, noise, schedules)")
            out["bwd: " + lab] += ev.cpu_time_total / 1e3 / steps
            attributed += ev.cpu_time_total / 1e3 / steps
    out["bwd: engine overhead"] = max(0.0, bwd_total - attributed)
    ops = defaultdict(float)
    for ev in events:
        if ev.name.startswith("pisces_fast::"):
            ops[ev.name] += ev.cpu_time_total / 1e3 / steps
    return dict(out), dict(ops)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--timed_steps", type=int, default=6, help="steps timed without the profiler (steps/s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config: profile the DeepSpeed engine (1 rank)")
    ap.add_argument("--trace", default=None, help="write a Chrome trace here")
    ap.add_argument("--tag", default="", help="a note stored with the CSV rows (e.g. 'before' / 'after')")
    ap.add_argument("override", nargs="*", help="extra --key value overrides of the world config")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="pisces_profile_") as out_dir:
        t0 = time.perf_counter()
        trainer = build_trainer(args, out_dir)
        print(f"trainer built in {time.perf_counter() - t0:.1f} s (OT map fit included)", flush=True)
        trainer.gen.denoiser.train()
        step = 0
        for _ in range(2):  # warm-up: allocator, one-time JIT/caches
            one_step(trainer, step)
            step += 1
        times = []
        for _ in range(args.timed_steps):
            t = time.perf_counter()
            one_step(trainer, step)
            times.append(time.perf_counter() - t)
            step += 1
        sec = statistics.median(times)
        instrument(trainer)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(args.steps):
                one_step(trainer, step)
                step += 1
            prof_sec = (time.perf_counter() - t) / args.steps
        if args.trace:
            prof.export_chrome_trace(args.trace)
        parts, ops = attribute(prof.events(), args.steps)

    total = sum(parts.values())
    load = os.getloadavg()[0]
    print(f"\nmain job (world CD, batch {trainer.cfg.data.batch_size}), {args.threads} threads, load {load:.1f}: "
          f"{sec * 1e3:.0f} ms/step = {1 / sec:.2f} steps/s (median of {args.timed_steps}, no profiler); "
          f"profiled {prof_sec * 1e3:.0f} ms/step")
    print(f"{'part':58s} {'ms/step':>9s} {'share':>7s}")
    rows = sorted(parts.items(), key=lambda kv: -kv[1])
    for name, ms in rows:
        print(f"{name:58s} {ms:9.1f} {100 * ms / total:6.1f}%")
    print("custom OT ops (inside the rows above):")
    for name, ms in sorted(ops.items(), key=lambda kv: -kv[1]):
        print(f"  {name:56s} {ms:9.2f} {100 * ms / total:6.2f}%")

    import csv
    import datetime as _dt

    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, "profile_train_step.csv")
    new = not os.path.exists(path)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["timestamp", "git_commit", "device", "tag", "deepspeed", "load_avg", "steps_per_s", "part",
                        "ms_per_step", "share"])
        common = [stamp, git_commit(), device_name(torch.device("cpu")), args.tag, args.deepspeed or "", f"{load:.2f}",
                  f"{1 / sec:.4f}"]
        for name, ms in rows:
            w.writerow(common + [name, f"{ms:.3f}", f"{ms / total:.4f}"])
        for name, ms in ops.items():
            w.writerow(common + ["op " + name, f"{ms:.3f}", f"{ms / total:.4f}"])
    print(f"rows appended to {path}")
    return parts, ops, sec


if __name__ == "__main__":
    main()
