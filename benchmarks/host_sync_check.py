"""Host syncs and fullgraph compile of the public ``ot_attention`` on a CUDA GPU (issue 13 item 4).

    python benchmarks/host_sync_check.py

Forward + backward of ``ot_attention`` (Triton backend, a layer call of the paper's shape: B = 8, 16 heads,
40 x 2049, D = 64, with a key padding mask), eager and under ``torch.compile(fullgraph=True)`` (inductor),
each run once more under ``torch.cuda.set_sync_debug_mode("error")``: any synchronizing CUDA call raises.
Prints a JSON summary: host syncs per mode, compiled-vs-eager difference, do_bench medians (ms).
"""
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

if not torch.cuda.is_available():
    raise SystemExit("host_sync_check needs a CUDA GPU")

import triton  # noqa: E402

from pisces_fast import ot_attention, video_token_positions  # noqa: E402

dev = "cuda"
res = {}
t, s = video_token_positions(8, 16, 16, prefix_tokens=1, dtype=torch.float32, device=dev)
M = t.numel()
B, H, N, D = 8, 16, 40, 64
g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(B, H, n, D, device=dev, generator=g) for n in (N, M, M))
dout = torch.randn(B, H, N, D, device=dev, generator=g)
kpm = torch.ones(B, M, dtype=torch.bool, device=dev)
kpm[1, -100:] = False


def fn(q, k, v):
    return ot_attention(q, k, v, t, s, mass=0.9, max_iter=100, tol=0.0, key_padding_mask=kpm, backend="triton")


def fwd_bwd(f):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = f(*leaves)
    out.backward(dout)
    return [out.detach()] + [x.grad for x in leaves]


for name, f in (("eager", fn), ("compiled", None)):
    try:
        if name == "compiled":
            torch._dynamo.reset()
            f = torch.compile(fn, fullgraph=True)
        got = fwd_bwd(f)
        if name == "eager":
            ref = got
        else:
            res["compiled_vs_eager_max_rel"] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fwd_bwd(f)
            res[f"{name}_host_syncs"] = "none (sync debug mode 'error' raised nothing)"
        except RuntimeError as e:
            res[f"{name}_host_syncs"] = "SYNC: " + str(e).splitlines()[0][:200]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        res[f"{name}_fwd_ms"] = triton.testing.do_bench(lambda: f(q, k, v), warmup=50, rep=300, return_mode="median")
        res[f"{name}_fwd_bwd_ms"] = triton.testing.do_bench(lambda: fwd_bwd(f), warmup=50, rep=300, return_mode="median")
    except Exception:
        traceback.print_exc()
        res[f"{name}_error"] = traceback.format_exc().splitlines()[-1][:300]
print(json.dumps(res, indent=1))
