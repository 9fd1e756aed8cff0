"""What GRPO-RM costs over fine-tuning (the paper's Table 5) on synthetic batches of a run's shape,
and its loss alone against cross-entropy.

    python3 tools/bench.py --dataset voc [grpo_rm.py's run flags] [--steps N --warmup N]
    torchrun --standalone --nproc_per_node=4 tools/bench.py --dataset imagenet --batch-size 1024
    python3 tools/bench.py --dataset imagefolder --loss-only 65536,21,65536,150 --out OUT

Writes OUT/bench-{task}-{dataset}-{model}-{img}px-b{batch}-w{world}[-compile].json (Table 5 in
tools/report.py); --loss-only OUT/loss-*.json (report.py reads each bench-*.json as a Table 5 row).
"""
import argparse
import copy
import functools
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS), TOOLS]  # grpo_rm.py and tools/report.py: no packages
import grpo_rm as G  # noqa: E402
import report  # noqa: E402  (Table 5's rows, printed as report.py prints them)

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, for MFU

def shapes(text):  # --loss-only 65536,21,65536,150 -> [(65536, 21), (65536, 150)]
    v = [int(s) for s in text.split(",")]
    if len(v) % 2 or min(v) < 2:
        raise argparse.ArgumentTypeError(f"{text}: pairs N,c of integers >= 2")
    return list(zip(v[::2], v[1::2]))

def get_args(argv=None):
    """-> (this tool's flags, grpo_rm.py's run flags): what it does not know goes to G.get_args."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Every other flag is grpo_rm.py's (--dataset is required).")
    p.add_argument("--steps", type=G.number(int, 1), default=10,
                   help="timed calls per method and round (torch.utils.benchmark adds 2 untimed)")
    p.add_argument("--warmup", type=G.number(int, 0), default=2,
                   help="untimed steps per method first (compilation, the allocator)")
    p.add_argument("--rounds", type=G.number(int, 1), default=5, help="rounds that alternate them")
    p.add_argument("--loss-only", type=shapes, metavar="N,c[,N,c...]",
                   help="only the loss alone, at N samples x c classes (no backbone)")
    own, rest = p.parse_known_args(argv)
    return own, G.get_args(rest)

def device_name(ctx):
    return torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"

def linear_macs(model, x):
    """Multiply-accumulates of the nn.Linear and nn.Conv2d layers in one forward of x: the unit of
    the paper's Table 5 "FLOPs" (21.23 M per ViT-S/14 token; attention's q kᵀ, a v excluded)."""
    total = 0
    def count(m, inputs, out):
        nonlocal total
        per_output = (m.in_features if isinstance(m, nn.Linear)
                      else m.in_channels // m.groups * math.prod(m.kernel_size))
        total += out.numel() * per_output
    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total

def bench_build(args, ctx, method, num_classes, backbone):
    """One method's model, optimizer, loss and synthetic batch (this process's share), built by
    G.train's own functions. -> (one G.train_step, θ_old's no-grad forward or None, the net)."""
    seg = args.task == "seg"
    torch.manual_seed(args.seed)
    net = G.build_net(copy.deepcopy(backbone), args.task, num_classes, args.hidden, args.seg_size)
    net = net.to(ctx.device)
    model, _, old = G.make_models(net, method, ctx.world, args.compile)
    opt, _ = G.make_optimizer(net, 1e-9, args.batch_size, 1, ctx.device)  # lr: keep θ ~ θ_old
    b, S = args.batch_size // ctx.world, args.img_size
    x = torch.randn(b, 3, S, S, device=ctx.device)
    y = torch.randint(0, num_classes, (b, S, S) if seg else (b,), device=ctx.device)
    loss_fn = G.make_loss(method, G.IGNORE if seg else -100, args.compile,
                          **{k: getattr(args, k) for k in G.LOSS_FLAGS})
    step = functools.partial(G.train_step, model, old, opt, loss_fn, x, y, seg, ctx.dtype,
                             ctx.world)

    def forward():
        with torch.no_grad(), G.autocast(ctx.device, ctx.dtype):
            old(x)
    return step, forward if old is not None else None, net

def time_rounds(fns, steps, ctx, rounds):
    """Seconds per call of each fn in rounds that alternate them (a drifting machine slows all
    alike): {name: one per round}. A fixed count, not blocked_autorange: DDP's ranks keep step."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if ctx.world > 1:
                dist.barrier()
            timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            times[name].append(timer.timeit(steps).mean)
    return {name: np.array(t) for name, t in times.items()}

def bench_methods(args, own, ctx, num_classes, backbone):
    """ce and grpo: FLOPs and (GPU) peak memory of each alone, then step times in alternating
    rounds; a time ratio is the median of the rounds' ratios."""
    cuda, built, rows = ctx.device.type == "cuda", {}, {}
    one = torch.zeros(1, 3, args.img_size, args.img_size, device=ctx.device)
    for m in ("ce", "grpo"):
        before = torch.cuda.memory_allocated(ctx.device) / 2**30 if cuda else 0  # ce's, for grpo
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        step, forward, net = built[m] = bench_build(args, ctx, m, num_classes, backbone)
        for _ in range(own.warmup):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        # A CPU process's resident set cannot be split between two methods: GPU only.
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 - before if cuda else None
        total = torch.tensor([peak or 0.0], dtype=torch.float64, device=ctx.device)
        if ctx.world > 1:
            dist.all_reduce(total)  # every rank's peak
        rows[m] = {"flops_per_step": counter.get_total_flops() * ctx.world,
                   "fwd_macs_per_image": linear_macs(net, one) * (2 if m == "grpo" else 1),
                   "peak_memory_gb": peak, "memory_sum_gb": total.item() if cuda else None}
    t = time_rounds({"ce": built["ce"][0], "grpo": built["grpo"][0], "old": built["grpo"][1]},
                    own.steps, ctx, own.rounds)
    for m, r in rows.items():
        r.update(ms_per_step=1e3 * np.median(t[m]), img_per_s=args.batch_size / np.median(t[m]))
    rows["grpo"].update(old_forward_ms=1e3 * np.median(t["old"]),
                        time_ratio=float(np.median(t["grpo"] / t["ce"])))
    return rows

def loss_fns(args, ctx):
    """Cross-entropy and GRPO-RM's loss as G.make_loss builds them (with the diagnostics), the
    latter eagerly and compiled (--compile). -> ({name: fn(z, z_old, y) -> (loss, ...)}, True)"""
    ignore = G.IGNORE if args.task == "seg" else -100
    plain = functools.partial(G.grpo_rm_loss, ignore_index=ignore, with_diagnostics=True,
                              **{k: getattr(args, k) for k in G.LOSS_FLAGS})
    fast = torch.compile(plain, dynamic=True)
    ce = G.make_loss("ce", ignore)
    return {"ce": ce, "grpo_eager": plain, "grpo_compiled": fast}, fast is not plain

def saved_bytes(fn, inputs, cuda):
    """One forward under saved_tensors_hooks, which see a compiled graph's tensors too (its
    CompiledFunction calls save_for_backward): Σ numel·element_size of what is saved; held: its
    distinct storages but the inputs' (kept beyond the logits); on GPU, what the allocator holds."""
    seen, total = {}, 0
    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    base = torch.cuda.memory_allocated() if cuda else 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(*inputs)[0]
    alloc = torch.cuda.memory_allocated() - base if cuda else None
    ins = {t.untyped_storage().data_ptr() for t in inputs}
    held = sum(v for k, v in seen.items() if k not in ins)
    return {"saved_bytes": total, "held_bytes": held, "cuda_held_bytes": alloc, "loss": loss.item()}

def bench_loss(n, c, fns, ctx, own):
    """The loss alone at n samples x c classes, forward + backward, all of fns in one run, under
    training's autocast (the compiled loss's guards see it)."""
    g = torch.Generator(device=ctx.device).manual_seed(0)
    z = torch.randn(n, c, device=ctx.device, generator=g).to(ctx.dtype).requires_grad_()
    z_old = (z.detach().float() + 0.1 * torch.randn(n, c, device=ctx.device, generator=g))
    z_old, y = z_old.to(z.dtype), torch.randint(0, c, (n,), device=ctx.device, generator=g)
    cuda = ctx.device.type == "cuda"

    def step(fn):
        z.grad = None
        with G.autocast(ctx.device, ctx.dtype):
            loss = fn(z, z_old, y)[0]
        loss.backward()
    out = {}
    for name, fn in fns.items():
        for _ in range(max(own.warmup, 1)):  # compiles at this shape
            step(fn)
        with G.autocast(ctx.device, ctx.dtype):
            out[name] = saved_bytes(fn, (z, z_old, y), cuda)
        if cuda:  # forward + backward's peak beyond what is allocated already (the inputs)
            z.grad, base = None, torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(fn)
            out[name]["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    t = time_rounds({k: functools.partial(step, f) for k, f in fns.items()}, own.steps, ctx,
                    own.rounds)
    for name, r in out.items():
        r.update(ms=1e3 * np.median(t[name]), time_ratio=float(np.median(t[name] / t["ce"])))
    return {"n": n, "c": c, "dtype": str(z.dtype)[6:], "logit_bytes": z.numel() * z.element_size(),
            **out}

# The paper's training-set sizes (its Table 1), for Table 5's seconds per epoch
PAPER_TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "stl10": 5_000,
                      "tinyimagenet": 100_000, "imagenet": 1_281_167, "voc": 1_464,
                      "ade20k": 20_210, "cocostuff": 118_287}

def compiled():
    """What torch.compile did in this process: dynamo's graphs, graph breaks (their reasons'
    first lines) and each compiled frame with its recompile reason (None: the first compile)."""
    from torch._dynamo.utils import counters, get_compilation_metrics
    frames = [(f"{m.co_name} ({os.path.basename(m.co_filename or '?')}:{m.co_firstlineno})",
               getattr(m, "recompile_reason", None)) for m in get_compilation_metrics()
              if getattr(m, "is_forward", True) is not False]  # a backward is no frame of its own
    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(why is not None for _, why in frames),
            "break_reasons": sorted({r.strip().split("\n")[0] for r in counters["graph_break"]}),
            "frames": frames}

def paper_units(rows, args, ctx):
    """Table 5's units: forward MACs per batch, seconds per epoch of the paper's training set (from
    the measured step time), and MFU against the GPU's dense bf16 peak."""
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name(ctx)), None)
    peak = peak if args.dtype == "bf16" else None
    images = PAPER_TRAIN_IMAGES.get(args.dataset)
    steps = math.ceil(images / args.batch_size) if images else None
    for r in rows.values():
        r["fwd_macs_per_batch"] = r["fwd_macs_per_image"] * args.batch_size
        r["sec_per_epoch_paper"] = r["ms_per_step"] * steps / 1e3 if steps else None
        flop_per_s = r["flops_per_step"] / (r["ms_per_step"] / 1e3)
        r["mfu"] = flop_per_s / (peak * ctx.world) if peak else None

def loss_lines(losses, compiled):
    """The loss alone as a markdown table: time, saved and held bytes, each also x cross-entropy."""
    out = ["| N x c | dtype | method | loss | ms | x ce | saved MiB | x ce | held MiB | x ce |",
           "|" + "---|" * 10]
    for L in losses:
        ce = L["ce"]
        for m in ("ce", "grpo_eager", "grpo_compiled"):
            r = L[m]
            cells = [f"{L['n']} x {L['c']}", L["dtype"], m, f"{r['loss']:.6f}", f"{r['ms']:.2f}",
                     f"x{r['time_ratio']:.2f}", f"{r['saved_bytes'] / 2**20:.1f}",
                     f"x{r['saved_bytes'] / ce['saved_bytes']:.2f}",
                     f"{r['held_bytes'] / 2**20:.1f}", f"x{r['held_bytes'] / ce['held_bytes']:.2f}"]
            out.append("| " + " | ".join(cells) + " |")
    return out + ["saved: Σ numel·element_size of what autograd saves (ce's log-probs twice: two "
                  "nodes save them); held: its storages but the inputs; x ce time: median of "
                  "per-round ratios" + ("" if compiled else "; no torch.compile here: eager")]

def method_lines(res):
    """Table 5's rows as tools/report.py prints them, and what they leave out."""
    ce, g = res["methods"]["ce"], res["methods"]["grpo"]
    mfu = " | ".join(f"{m} {100 * r['mfu']:.1f}%" for m, r in res["methods"].items() if r["mfu"])
    flops = g["flops_per_step"] / ce["flops_per_step"]
    return report.bench_table([res], [])[2:-1] + [
        f"grpo/ce: time x{g['time_ratio']:.3f}, FLOPs x{flops:.3f}; θ_old's forward alone "
        f"{g['old_forward_ms']:.1f} ms; img/s ce {ce['img_per_s']:.0f}, grpo {g['img_per_s']:.0f}"
        + (f"; MFU {mfu}" if mfu else "")]

def write(args, ctx, name, result, lines):
    if ctx.rank == 0:
        print("\n".join(lines), flush=True)
        os.makedirs(args.out, exist_ok=True)
        text = json.dumps(result, indent=1).encode()
        G.atomic_save(os.path.join(args.out, name), lambda f: f.write(text))
    return result

def bench(args, own, ctx):
    """ce and grpo (under torchrun one process per GPU, the batch split as in training), then the
    loss alone at the run's shape. Prints the figures; writes OUT/bench-*.json."""
    spec = G.DATASETS[args.dataset]
    torch.manual_seed(args.seed)  # a randomly initialised backbone: the same on every rank
    backbone = G.rank0_first(ctx, lambda: G.load_backbone(args.hub_repo, args.model, args.weights,
                                                          args.hub_kwargs))
    args.img_size = args.img_size or G.default_img_size(spec, backbone.patch_size)
    num_classes = args.num_classes or spec.classes
    num_classes = num_classes or (os.path.isdir(args.data_dir) and G.build_data(args, ctx)[0])
    if not num_classes:
        raise G.UserError(f"--dataset {args.dataset}: give --num-classes or --data-dir")
    b = args.batch_size // ctx.world
    n = b * args.seg_size**2 if args.task == "seg" else b  # the loss's samples: pixels, images
    try:
        rows = bench_methods(args, own, ctx, num_classes, backbone)
        fns, fast = loss_fns(args, ctx)
        loss = bench_loss(n, num_classes, fns, ctx, own)
    except torch.OutOfMemoryError:
        msg = f"out of GPU memory at {b} images per process; lower --batch-size"
        raise G.UserError(msg) from None
    paper_units(rows, args, ctx)
    cfg = {**vars(args), "no_sdpa": False}  # report.py's Table 5 reads it; the flag is gone
    result = {"config": cfg, "bench": vars(own), "device": device_name(ctx),
              "world_size": ctx.world, "torch": torch.__version__, "methods": rows, "loss": loss,
              "loss_compiled": fast, "compiled": compiled(), "date": time.strftime("%Y-%m-%d")}
    name = (f"bench-{args.task}-{args.dataset}-{args.model}-{args.img_size}px-b{args.batch_size}-"
            f"w{ctx.world}{'-compile' if args.compile else ''}.json")
    return write(args, ctx, name, result, method_lines(result) + loss_lines([loss], fast))

def loss_only(args, own, ctx):
    """--loss-only: the loss alone at each N, c; no backbone. Writes OUT/loss-*.json."""
    fns, fast = loss_fns(args, ctx)
    losses = [bench_loss(n, c, fns, ctx, own) for n, c in own.loss_only]
    result = {"config": vars(args), "bench": vars(own), "device": device_name(ctx),
              "world_size": ctx.world, "torch": torch.__version__, "threads":
              torch.get_num_threads(), "loss_compiled": fast, "losses": losses,
              "compiled": compiled(), "date": time.strftime("%Y-%m-%d")}
    name = (f"loss-{ctx.device.type}-{losses[0]['dtype']}-"
            + "-".join(f"{n}x{c}" for n, c in own.loss_only) + ".json")
    head = [f"loss alone, forward + backward, on {result['device']} ({result['threads']} threads)"]
    return write(args, ctx, name, result, head + loss_lines(losses, fast))

def main(argv=None):
    own, args = get_args(argv)
    ctx = G.setup(args.device, args.dtype, args.dist_backend)
    try:
        return (loss_only if own.loss_only else bench)(args, own, ctx)
    finally:
        if ctx.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

def cli(argv=None):
    """main, with a UserError as one `error:` line and exit code 2."""
    try:
        main(argv)
    except G.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    cli()
