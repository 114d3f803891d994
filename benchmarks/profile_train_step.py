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

    python benchmarks/profile_train_step.py [--omp_wait_policy PASSIVE] [--threads 2 1] [--rounds 3] [--steps 2]
                                            [--deepspeed configs/ds_zero2.json] [--world.ot_map_steps 5 ...]

RESULTS.md's before/after alternates whole runs: ``--omp_wait_policy unset`` (before), ``PASSIVE`` (after), unset,
PASSIVE, each with ``--threads 2 1 --rounds 2 --round_steps 2`` (the first with ``--rounds 3``).

The machine these numbers come from is shared, so wall-clock time is not trusted alone: every step is timed by
wall clock AND by this process's CPU time (``time.process_time``: all its threads; much less sensitive to other
work on the machine, but it counts OpenMP threads spinning at a barrier), the variants (``--threads``: intra-op
thread counts; 1 thread has no barriers and serves as the control for the load) are timed interleaved on one trainer — A, B, A, B, ... for ``--rounds``
rounds of ``--round_steps`` steps — and medians are reported with the load average. Then each variant is profiled
for ``--steps`` steps: the forward pieces get CPU time from ``time.process_time`` around each labelled call (self
time, children excluded), the backward's CPU time is split over the forward labels in the proportions of the
profiler's autograd-node times.

OpenMP's wait policy is the other thread setting: libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads, and
train.py sets it to PASSIVE unless it is set already (a thread waiting at a barrier sleeps instead of spinning: on
cores shared with other work a spinning thread burns the time slice its descheduled peer needs).
``--omp_wait_policy`` (PASSIVE, as train.py; ACTIVE; unset = libgomp's default) re-runs this script with it set.

Prints a table per variant (ms per step: wall under the profiler and CPU; % of the step's CPU), appends to
``benchmarks/results/profile_train_step.csv`` (``--csv``) and writes a Chrome trace per variant (``--trace PREFIX``).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

OMP_WAIT_POLICIES = ("PASSIVE", "ACTIVE", "unset")


def _exec_with_omp_wait_policy(argv: list) -> None:
    """Re-run this script with OMP_WAIT_POLICY as --omp_wait_policy asks (default PASSIVE, as train.py sets it),
    before torch (and with it libgomp, which reads the variable once) is loaded."""
    want = "PASSIVE"
    for i, a in enumerate(argv):
        if a == "--omp_wait_policy" and i + 1 < len(argv):
            want = argv[i + 1]
        elif a.startswith("--omp_wait_policy="):
            want = a.split("=", 1)[1]
    if want not in OMP_WAIT_POLICIES or os.environ.get("OMP_WAIT_POLICY", "unset") == want:
        return  # a bad value is argparse's to report
    env = dict(os.environ)
    if want == "unset":
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = want
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv), env)


if __name__ == "__main__":
    _exec_with_omp_wait_policy(sys.argv[1:])

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _harness import RESULTS_DIR, device_name, git_commit  # noqa: E402

LABEL = "step/"  # prefix of our record_function ranges


CPU_SELF = defaultdict(float)  # label -> process CPU seconds inside it, its labelled children excluded
_CPU_STACK: list = []  # [label, start, children's CPU] of the open labelled calls


def _wrap(obj, attr: str, label: str):
    """obj.attr(...) runs inside record_function(LABEL + label); its CPU time goes to CPU_SELF[label] (`label`: a
    string, or a function returning one at call time)."""
    fn = getattr(obj, attr)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        name = label() if callable(label) else label
        frame = [name, time.process_time(), 0.0]
        _CPU_STACK.append(frame)
        try:
            with torch.profiler.record_function(LABEL + name):
                return fn(*args, **kwargs)
        finally:
            _CPU_STACK.pop()
            inclusive = time.process_time() - frame[1]
            CPU_SELF[name] += inclusive - frame[2]
            if _CPU_STACK:
                _CPU_STACK[-1][2] += inclusive

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
    # The denoiser's calls by role: inside gen.guided it is the CD teacher (CFG, cond + uncond in one batch, no grad);
    # otherwise the student (grad) or the EMA target (no grad).
    in_guided = [False]
    guided = gen.guided

    @functools.wraps(guided)
    def guided_flagged(*args, **kwargs):
        in_guided[0] = True
        try:
            return guided(*args, **kwargs)
        finally:
            in_guided[0] = False

    gen.guided = guided_flagged
    _wrap(gen.denoiser, "forward", lambda: "generator forward, " + (
        "teacher (CFG)" if in_guided[0] else "student" if torch.is_grad_enabled() else "EMA target"))
    reward = trainer.reward
    if reward is not None and hasattr(reward, "backbone"):
        _wrap(reward.backbone, "encode_text", "reward text backbone")
        _wrap(reward.backbone, "encode_video", "reward video backbone")
        _wrap(pr, "quality_reward", "reward quality head (OT map)")
        _wrap(pr, "semantic_reward", "reward semantic head (ITM + OT attention)")
    _wrap(trainer.mode, "after_optimizer_step", "EMA update")


PHASE_CPU = defaultdict(float)  # "loss (forward)" / "backward" / "optimizer step" -> process CPU seconds


def one_step(trainer, step: int):
    """The body of Trainer.train's loop for one optimizer step (grad_accum = 1)."""
    batch = next(trainer.batches)
    t = time.process_time()
    with torch.profiler.record_function(LABEL + "loss (forward)"):
        loss, _ = trainer.mode.loss(batch, step)
    t1 = time.process_time()
    with torch.profiler.record_function(LABEL + "backward"):
        trainer.backend.backward(loss)
    t2 = time.process_time()
    opt = "optimizer step" + (" (DeepSpeed)" if trainer.cfg.deepspeed else "")
    with torch.profiler.record_function(LABEL + opt):
        trainer.backend.micro_step(boundary=True)
    t3 = time.process_time()
    trainer.mode.after_optimizer_step()
    PHASE_CPU["loss (forward)"] += t1 - t
    PHASE_CPU["backward"] += t2 - t1
    PHASE_CPU[opt] += t3 - t2


def timed_step(trainer, step: int) -> tuple:
    """(wall s, process CPU s) of one step."""
    w, c = time.perf_counter(), time.process_time()
    one_step(trainer, step)
    return time.perf_counter() - w, time.process_time() - c


def cpu_attribution(wall_parts: dict, steps: int) -> dict:
    """CPU ms per step for the rows of `attribute`: labelled forward calls and the optimizer / EMA from their own
    CPU clocks; the backward's CPU split in the proportions of the profiler's backward rows; the unlabelled rest of
    the forward as the remainder."""
    out = {}
    for name, sec in CPU_SELF.items():
        kind = "" if name == "EMA update" else "fwd: "
        out[kind + name] = sec * 1e3 / steps
    fwd_total = PHASE_CPU["loss (forward)"] * 1e3 / steps
    labelled = sum(v for k, v in out.items() if k.startswith("fwd: "))
    out["fwd: other (losses, noise, schedules, fusion)"] = max(0.0, fwd_total - labelled)
    bwd_rows = {k: v for k, v in wall_parts.items() if k.startswith("bwd: ")}
    bwd_wall = sum(bwd_rows.values())
    for k, v in bwd_rows.items():
        out[k] = PHASE_CPU["backward"] * 1e3 / steps * (v / bwd_wall if bwd_wall else 0.0)
    for k, v in PHASE_CPU.items():
        if k.startswith("optimizer"):
            out[k] = v * 1e3 / steps
    return out


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
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                    help="intra-op thread counts to compare, interleaved on one trainer (the first is 'before')")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (each variant once per round)")
    ap.add_argument("--round_steps", type=int, default=2, help="timed steps per variant per round (no profiler)")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps per variant")
    ap.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config: profile the DeepSpeed engine (1 rank)")
    ap.add_argument("--trace", default=None, help="write a Chrome trace per variant: TRACE-threadsN.json")
    ap.add_argument("--omp_wait_policy", choices=OMP_WAIT_POLICIES, default="PASSIVE",
                    help="OpenMP wait policy of this run (PASSIVE as train.py sets it; unset = libgomp's default)")
    ap.add_argument("--csv", default=os.path.join(RESULTS_DIR, "profile_train_step.csv"),
                    help="rows are appended here (the file is rewritten if its columns differ)")
    args, extra = ap.parse_known_args(argv)
    args.override = extra  # any other `--key value`: an override of the world config (e.g. --world.ot_map_steps 5)
    if any(n < 1 for n in args.threads):
        ap.error(f"--threads: expected integers >= 1, got {args.threads}")

    device = device_name(torch.device("cpu")).split(" (")[0]  # the thread count is a column of its own
    timings = defaultdict(list)  # threads -> [(wall s, cpu s, load)]
    profiles = {}
    with tempfile.TemporaryDirectory(prefix="pisces_profile_") as out_dir:
        t0 = time.perf_counter()
        trainer = build_trainer(args, out_dir)
        print(f"trainer built in {time.perf_counter() - t0:.1f} s (OT map fit included)", flush=True)
        trainer.gen.denoiser.train()
        instrument(trainer)
        step = 0
        for n in args.threads:  # warm-up: allocator, one-time JIT/caches, each thread pool
            torch.set_num_threads(n)
            one_step(trainer, step)
            step += 1
        for r in range(args.rounds):
            for n in args.threads:
                torch.set_num_threads(n)
                for _ in range(args.round_steps):
                    wall, cpu = timed_step(trainer, step)
                    step += 1
                    timings[n].append((wall, cpu, os.getloadavg()[0]))
                    print(f"round {r} threads {n}: wall {wall:6.2f} s  cpu {cpu:6.2f} s  load {os.getloadavg()[0]:.1f}",
                          flush=True)
        for n in args.threads:
            torch.set_num_threads(n)
            CPU_SELF.clear()
            PHASE_CPU.clear()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                for _ in range(args.steps):
                    one_step(trainer, step)
                    step += 1
                prof_sec = (time.perf_counter() - t) / args.steps
            if args.trace:
                prof.export_chrome_trace(f"{args.trace}-threads{n}.json")
            parts, ops = attribute(prof.events(), args.steps)
            profiles[n] = (parts, cpu_attribution(parts, args.steps), ops, prof_sec, os.getloadavg()[0])

    batch = trainer.cfg.data.batch_size
    summary = {}
    for n in args.threads:
        walls, cpus, loads = zip(*timings[n])
        summary[n] = (statistics.median(walls), statistics.median(cpus), statistics.median(loads))
    print(f"\nmain job (world CD, batch {batch}), OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"{args.rounds} interleaved rounds x {args.round_steps} steps per variant")
    base = summary[args.threads[0]]
    for n in args.threads:
        wall, cpu, load = summary[n]
        print(f"  threads {n}: {wall:6.2f} s/step wall = {1 / wall:.3f} steps/s ({base[0] / wall:.2f}x), "
              f"{cpu:6.2f} s/step CPU ({base[1] / cpu:.2f}x), median load {load:.1f}")
    for n in args.threads:
        parts, cpu_parts, ops, prof_sec, load = profiles[n]
        total = sum(cpu_parts.values())
        print(f"\nthreads {n}, profiled {args.steps} steps at load {load:.1f}: {prof_sec:.2f} s/step wall, "
              f"{total / 1e3:.2f} s/step CPU")
        print(f"{'part':58s} {'wall ms':>9s} {'CPU ms':>9s} {'CPU %':>7s}")
        for name in sorted(cpu_parts, key=lambda k: -cpu_parts[k]):
            print(f"{name:58s} {parts.get(name, 0.0):9.1f} {cpu_parts[name]:9.1f} {100 * cpu_parts[name] / total:6.1f}%")
        for name, ms in sorted(ops.items(), key=lambda kv: -kv[1]):
            print(f"  custom op {name:46s} {ms:9.2f} (wall, inside the rows above)")

    import csv
    import datetime as _dt

    path = args.csv
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    header = ["timestamp", "git_commit", "device", "omp_wait_policy", "threads", "deepspeed", "load_avg", "row",
              "wall_ms_per_step", "cpu_ms_per_step", "cpu_share"]
    append = False
    if os.path.exists(path):
        with open(path, newline="", encoding="utf-8") as f:
            append = next(csv.reader(f), None) == header
    with open(path, "a" if append else "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if not append:
            w.writerow(header)
        common = [stamp, git_commit(), device, os.environ.get("OMP_WAIT_POLICY", "unset")]
        for n in args.threads:
            for i, (wall, cpu, load) in enumerate(timings[n]):
                w.writerow(common + [n, args.deepspeed or "", f"{load:.2f}", f"timed step {i}", f"{wall * 1e3:.1f}",
                                     f"{cpu * 1e3:.1f}", ""])
            wall, cpu, load = summary[n]
            w.writerow(common + [n, args.deepspeed or "", f"{load:.2f}", "median step (no profiler)",
                                 f"{wall * 1e3:.1f}", f"{cpu * 1e3:.1f}", ""])
            parts, cpu_parts, ops, prof_sec, load = profiles[n]
            total = sum(cpu_parts.values())
            for name in sorted(cpu_parts, key=lambda k: -cpu_parts[k]):
                w.writerow(common + [n, args.deepspeed or "", f"{load:.2f}", name, f"{parts.get(name, 0.0):.1f}",
                                     f"{cpu_parts[name]:.1f}", f"{cpu_parts[name] / total:.4f}"])
            for name, ms in ops.items():
                w.writerow(common + [n, args.deepspeed or "", f"{load:.2f}", "op " + name, f"{ms:.2f}", "", ""])
    print(f"rows written to {path}")
    return summary, profiles


if __name__ == "__main__":
    main()
