"""Throughput and peak memory of every batch method: ours (default), ours fast, and a plain loop
written like the official code, side by side in one table.

    python scripts/bench_methods.py --fast                             # CPU: a small model
    python scripts/bench_methods.py --device cuda --model resnet50 --batch-size 64 --fast
    python scripts/bench_methods.py --device cuda --model vit_base_patch16_224 --fast
    python scripts/bench_methods.py --data digits-c --batch-sizes 1,4,16,64 --repeats 3   # a stream that looks like use

For each method the implementations adapt the same random-weight timm model (its head scaled so
that about half of the samples pass the 0.4 ln C entropy filter, so the filters do real work) on
the same random batches, one after the other in this process. The plain loop is what the official
repositories do, in their structure: an ``nn.Module`` wrapper whose ``forward`` checks ``episodic``
and runs ``steps`` calls of an ``@torch.enable_grad()`` adapt function, the entropy as their
``@torch.jit.script`` ``softmax_entropy``, called by an evaluation loop under ``torch.no_grad()``
(entered outside the timed call, once per batch here as once per loop there); fp32, eager, index
lists for the selections, ``.item()`` / ``len()`` on the host, a Python loop over all named
parameters for EATA's Fisher term, SAM as an optimizer wrapper with per-parameter loops, a
deep-copied frozen model for wisdom-of-crowds; ``source`` is the bare model under ``no_grad``.

Columns: ``ours`` is the method as built (fp32 eager; ``--amp``, ``--channels-last`` and
``--compile`` change it), ``ours fast`` the fast preset (``prepare(fast=True)``: bf16 autocast,
channels_last for CNNs, the compiled step; ``fast compile s`` is the time of its warm-up steps,
i.e. mostly compiling). Ours runs with ``nonfinite="skip", input_range=None`` unless
``--input-check`` (the default input check costs one host sync per batch; the plain loops check
nothing). On CUDA, ``syncs/step`` counts the synchronising CUDA calls of a warm step
(``torch.cuda.set_sync_debug_mode``): 0 for every method but DeYO (its PLPD subset size).
Rows are printed as they finish.

``--data digits-c`` streams real data instead: the digits test split under the 15 corruptions at
severity 5, one corruption after the other, never a batch twice, through a shipped digits model
(``digits_cnn``, or ``--model digits_gn``) with its trained weights, so the filters keep what they
keep in use. For each batch size of ``--batch-sizes`` and each method, ours and the official-style
loop adapt the same stream side by side, **interleaved batch by batch** (the order alternating) so
that a machine shared with other work slows both alike; ``--repeats`` runs it again from fresh
copies. The table gives the median images/s, ``ours / official`` as the median ratio of the
repeats with its range, and the share of batches whose selection was empty (counters
``skipped_empty`` + ``empty_selection_steps``). ``--repeats`` with random data adds the same
interleaved ratio to the table above.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import tta.methods as methods
from tta.methods.speed import is_cnn
from tta.models import load_classifier

METHODS = ("source", "norm", "tent", "eta", "eata", "sar", "deyo", "crowds", "eata_c", "rdumb", "lame", "cotta", "rotta",
           "sotta", "roid")
NORM = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


# ---------------------------------------------------------------- the official-style plain loops
@torch.jit.script
def ent(z: torch.Tensor) -> torch.Tensor:
    """The official ``softmax_entropy`` (Tent, EATA, SAR, DeYO: a TorchScript function)."""
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def plain_configure(net: nn.Module, preset: str) -> list[tuple[str, nn.Parameter]]:
    net.train()
    net.requires_grad_(False)
    params = []
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
        if not isinstance(m, NORM):
            continue
        if preset == "sar" and (any(k in name for k in ("layer4", "blocks.9", "blocks.10", "blocks.11"))
                                or "norm." in name or name == "norm"):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if pname in ("weight", "bias"):
                p.requires_grad_(True)
                params.append((f"{name}.{pname}", p))
    return params


class Plain(nn.Module):
    """The official wrapper (``Tent``, ``EATA``, ``SAR``, ``DeYO``: an ``nn.Module``): ``forward``
    resets when ``episodic`` and runs ``steps`` calls of the method's ``adapt`` (their
    ``forward_and_adapt*``, decorated with ``@torch.enable_grad()``). The evaluation loop around it
    runs under ``torch.no_grad()`` (:func:`eval_context`)."""

    preset = "norm"
    episodic = False
    steps = 1

    def __init__(self, clf, lr: float):
        super().__init__()
        self.net = clf.net
        self.mean, self.std = clf.mean, clf.std
        self.params = plain_configure(self.net, self.preset)
        self.opt = torch.optim.SGD([p for _, p in self.params], lr=lr, momentum=0.9)
        self.c = math.log(clf.num_classes)

    def model(self, x):
        return self.net((x - self.mean) / self.std)

    #: the host counters the official ``forward`` adds the adapt function's extra return values to (EATA, DeYO)
    counts: tuple[str, ...] = ()

    def forward(self, x):
        if self.episodic:
            self.reset()
        for _ in range(self.steps):
            outputs = self.adapt(x)
            if self.counts:
                outputs, *values = outputs
                for name, value in zip(self.counts, values):
                    setattr(self, name, getattr(self, name, 0) + value)
        return outputs


class PlainTent(Plain):
    @torch.enable_grad()
    def adapt(self, x):
        out = self.model(x)
        ent(out).mean(0).backward()
        self.opt.step()
        self.opt.zero_grad()
        return out


class PlainEATA(Plain):
    fishers = None

    def __init__(self, clf, lr, fisher_data=None):
        super().__init__(clf, lr)
        self.m = None
        if fisher_data is not None:
            self.fishers = {}
            for it, xb in enumerate(fisher_data, start=1):
                out = self.model(xb)
                F.cross_entropy(out, out.max(1)[1]).backward()
                for name, p in self.net.named_parameters():
                    if p.grad is not None:
                        f = p.grad.data.clone() ** 2 + (self.fishers[name][0] if it > 1 else 0)
                        if it == len(fisher_data):
                            f = f / it
                        self.fishers[name] = [f, p.data.clone()]
                self.opt.zero_grad()

    counts = ("num_samples_update_2", "num_samples_update_1")  # the official EATA.forward's

    @torch.enable_grad()
    def adapt(self, x):
        e_margin = 0.4 * self.c
        out = self.model(x)
        e = ent(out)
        ids1 = torch.where(e < e_margin)
        ids2 = torch.where(ids1[0] > -0.1)
        e = e[ids1]
        if self.m is not None:
            cos = F.cosine_similarity(self.m.unsqueeze(0), out[ids1].softmax(1), dim=1)
            ids2 = torch.where(torch.abs(cos) < 0.05)
            e = e[ids2]
            new = out[ids1][ids2].softmax(1)
        else:
            new = out[ids1].softmax(1)
        if new.size(0) > 0:
            with torch.no_grad():
                self.m = new.mean(0) if self.m is None else 0.9 * self.m + 0.1 * new.mean(0)
        loss = e.mul(1 / torch.exp(e.clone().detach() - e_margin)).mean(0)
        if self.fishers is not None:
            ewc = 0
            for name, p in self.net.named_parameters():
                if name in self.fishers:
                    ewc += 2000.0 * (self.fishers[name][0] * (p - self.fishers[name][1]) ** 2).sum()
            loss += ewc
        if x[ids1][ids2].size(0) != 0:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad()
        return out, e.size(0), ids1[0].size(0)


class PlainSAR(Plain):
    preset = "sar"

    def __init__(self, clf, lr):
        super().__init__(clf, lr)
        self.ema = None
        self.initial = copy.deepcopy(self.net.state_dict())

    @torch.enable_grad()
    def adapt(self, x):
        margin, rho = 0.4 * self.c, 0.05
        self.opt.zero_grad()
        out = self.model(x)
        e = ent(out)
        ids1 = torch.where(e < margin)
        e[ids1].mean(0).backward()
        ps = [p for _, p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in ps]), p=2)
        old = {}
        with torch.no_grad():
            for p in ps:
                old[p] = p.data.clone()
                p.add_(p.grad * (rho / (norm + 1e-12)))
        self.opt.zero_grad()
        e2 = ent(self.model(x))[ids1]
        loss2 = e2[torch.where(e2 < margin)].mean(0)
        if not math.isnan(loss2.item()):
            self.ema = loss2.item() if self.ema is None else 0.9 * self.ema + 0.1 * loss2.item()
        loss2.backward()
        for p in ps:
            p.data = old[p]
        self.opt.step()
        self.opt.zero_grad()
        if self.ema is not None and self.ema < 0.2:
            self.net.load_state_dict(self.initial)
        return out


class PlainDeYO(Plain):
    preset = "sar"
    counts = ("backward_samples", "final_backward_samples")  # the official DeYO.forward's

    @torch.enable_grad()
    def adapt(self, x):
        out = self.model(x)
        self.opt.zero_grad()
        e = ent(out)
        ids1 = torch.where(e < 0.5 * self.c)
        e = e[ids1]
        backward = len(e)
        if backward == 0:
            return out, 0, 0
        xp = x[ids1].detach()
        n, ch, h, w = xp.shape
        p = 4
        tiles = xp.reshape(n, ch, p, h // p, p, w // p).permute(0, 2, 4, 1, 3, 5).reshape(n, p * p, ch, h // p, w // p)
        perm = torch.argsort(torch.rand(n, p * p), dim=-1)
        tiles = tiles[torch.arange(n).unsqueeze(-1), perm]
        xp = tiles.reshape(n, p, p, ch, h // p, w // p).permute(0, 3, 1, 4, 2, 5).reshape(n, ch, h, w)
        with torch.no_grad():
            outp = self.model(xp)
        prob, probp = out[ids1].softmax(1), outp.softmax(1)
        cls = prob.argmax(dim=1).reshape(-1, 1)
        plpd = (torch.gather(prob, 1, cls) - torch.gather(probp, 1, cls)).reshape(-1)
        ids2 = torch.where(plpd > 0.2)
        e = e[ids2]
        final_backward = len(e)
        if final_backward == 0:
            return out, backward, 0
        plpd = plpd[ids2]
        coeff = 1 / torch.exp(e.clone().detach() - 0.4 * self.c) + 1 / torch.exp(-1.0 * plpd.clone().detach())
        e.mul(coeff).mean(0).backward()
        self.opt.step()
        self.opt.zero_grad()
        return out, backward, final_backward


class PlainCrowds(Plain):
    def __init__(self, clf, lr):
        super().__init__(clf, lr)
        self.net0 = copy.deepcopy(self.net)

    @torch.enable_grad()
    def adapt(self, x):
        p0 = self.net0((x - self.mean) / self.std).softmax(1)
        v0, i0 = p0.max(1)
        out = self.model(x)
        v = out.softmax(1)[torch.arange(p0.size(0)), i0]
        loss = ent(out)[v >= v0].mean(0)
        pm = out.softmax(1).mean(0)
        loss -= 0.5 * (-(pm * torch.log(pm)).sum())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return out


class PlainSource:
    """The source model as trained: eval mode (BatchNorm running statistics), called bare by the
    evaluation loop (under its ``no_grad``)."""

    def __init__(self, clf, lr):
        self.net = clf.net.eval().requires_grad_(False)
        self.mean, self.std = clf.mean, clf.std

    def __call__(self, x):
        return self.net((x - self.mean) / self.std)


class PlainNorm(Plain):
    """BN adaptation (Tent's ``Norm`` module): BatchNorm on test-batch statistics, no update."""

    def __init__(self, clf, lr):
        nn.Module.__init__(self)
        self.net = clf.net
        self.mean, self.std = clf.mean, clf.std
        plain_configure(self.net, "norm")
        self.net.requires_grad_(False)

    def forward(self, x):
        return self.model(x)


PLAIN = {"source": PlainSource, "norm": PlainNorm, "tent": PlainTent, "eta": PlainEATA, "eata": PlainEATA, "sar": PlainSAR, "deyo": PlainDeYO, "crowds": PlainCrowds}


# ---------------------------------------------------------------- harness
def build_net(name: str, num_classes: int, device: torch.device, size: int) -> nn.Module:
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=num_classes).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = load_classifier(net, pretrained=False)
    clf.train()
    from tta.models.params import use_batch_statistics

    probe = copy.deepcopy(clf)
    use_batch_statistics(probe)
    with torch.no_grad():
        logits = probe(torch.rand(32, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(1)))
    target, lo, hi = 0.4 * math.log(num_classes), 0.0, 1e4  # median entropy -> 0.4 ln C: half the samples pass
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(ent(logits * mid).median()) > target else (lo, mid)
    head = clf.head()
    with torch.no_grad():
        head.weight.mul_(hi)
        if head.bias is not None:
            head.bias.mul_(hi)
    return clf


def eval_context(impl) -> contextlib.AbstractContextManager:
    """The grad mode an implementation is called in: the official evaluation loops run under
    ``torch.no_grad()`` (their adapt functions turn gradients back on); ours is called as a user
    calls it. Entered outside the timed call."""
    return torch.no_grad() if isinstance(impl, (Plain, PlainSource)) else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, xs, iters: int, warmup: int, device: torch.device,
            autocast=None) -> tuple[float, float | None, float]:
    """(images per second, peak CUDA MiB, seconds of the warm-up steps: the compile time of a compiled step)."""
    ctx = autocast or (lambda: torch.autocast(device.type, enabled=False))
    with eval_context(step):
        return _measure(step, xs, iters, warmup, device, ctx)


def _measure(step, xs, iters, warmup, device, ctx) -> tuple[float, float | None, float]:
    sync(device)
    start = time.perf_counter()
    for i in range(warmup):
        with ctx():
            step(xs[i % len(xs)])
    sync(device)
    warm = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(iters):
        with ctx():
            step(xs[i % len(xs)])
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return iters * xs[0].shape[0] / elapsed, peak, warm


def count_syncs(step, xs, steps: int, device: torch.device) -> float | None:
    """Synchronising CUDA calls per step (``torch.cuda.set_sync_debug_mode``), after the measurement
    (so the step is warm). ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                step(xs[i % len(xs)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def interleaved(impls, xs, warmup: int, device: torch.device) -> list[float]:
    """Seconds each of ``impls`` spent on the batches ``xs[warmup:]``, the implementations taking
    turns batch by batch (the order alternating), so a machine shared with other work slows them alike."""
    spent = [0.0] * len(impls)
    for i, x in enumerate(xs):
        order = list(range(len(impls)))
        if i % 2:
            order.reverse()
        for k in order:
            with eval_context(impls[k]):
                sync(device)
                start = time.perf_counter()
                impls[k](x)
                sync(device)
                elapsed = time.perf_counter() - start
            if i >= warmup:
                spent[k] += elapsed
    return spent


def digits_c_stream(batch_size: int, batches: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """``batches`` batches of the digits test split under the 15 corruptions at severity 5, one
    corruption after the other (a domain stream, as a digits-C run), no batch repeated."""
    from tta.data.corruptions import CORRUPTIONS, corrupt
    from tta.data.digits import load_digits_split

    images, _ = load_digits_split("test")
    out: list[torch.Tensor] = []
    for k, name in enumerate(CORRUPTIONS[:15]):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + k))
        domain = corrupt(images[order], name, 5, seed=seed + k).clamp(0, 1)
        full = len(domain) // batch_size * batch_size
        out.extend(domain[:full].to(device).split(batch_size))
        if len(out) >= batches:
            break
    if len(out) < batches:
        raise ValueError(f"digits-C holds {len(out)} batches of {batch_size}, fewer than {batches}")
    return out[:batches]


def main_stream(args, device: torch.device) -> None:
    """``--data digits-c``: ours against the official-style loop on a real stream (see the module docstring)."""
    from tta.data.digits import load_digits_split

    model = args.model or "digits_cnn"
    sizes = [int(b) for b in (args.batch_sizes or "1,4,16,64").split(",")]
    names = [m.strip() for m in args.methods.split(",") if m.strip() in PLAIN]
    checks = {} if args.input_check else {"nonfinite": "skip", "input_range": None}
    clean, _ = load_digits_split("train")
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{model} (shipped weights), digits-C severity 5 stream, {dev}, torch {torch.__version__}; "
          f"{args.repeats} repeat(s), batches interleaved; ours: fp32 eager, skip_empty={args.skip_empty}"
          f"{'' if args.input_check else ' (input check off)'}; official-style: fp32 eager.\n", flush=True)
    cols = ["method", "batch", "ours img/s", "official-style img/s", "ours / official (median, range)",
            "empty selections (ours)", "kept (ours)"]
    print("| " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * (len(cols) - 1), flush=True)
    for bs in sizes:
        iters = args.iters or max(12, min(96, 768 // bs))
        warmup = args.warmup if args.warmup is not None else 2
        xs = digits_c_stream(bs, warmup + iters, device)
        fisher = [clean[i:i + max(bs, 16)].to(device) for i in range(0, 2 * max(bs, 16), max(bs, 16))]
        for name in names:
            ratios, ours_rate, plain_rate, empty, kept = [], [], [], 0.0, 0.0
            for r in range(args.repeats):
                torch.manual_seed(r)
                base = load_classifier(model).to(device)
                kwargs = {"fisher_data": fisher} if name == "eata" else {}
                method = methods.build(name, copy.deepcopy(base), batch_size=bs, skip_empty=args.skip_empty,
                                       **checks, **kwargs).prepare(device=device)
                if hasattr(method, "ensure_fisher"):
                    method.ensure_fisher()
                lr = 1e-3 if name == "crowds" else methods.niu_learning_rate("cnn", bs, name in ("sar", "deyo"))
                plain = PLAIN[name](copy.deepcopy(base), lr, **({"fisher_data": fisher} if name == "eata" else {}))
                t_ours, t_plain = interleaved([method, plain], xs, warmup, device)
                n = iters * bs
                ratios.append(t_plain / t_ours)
                ours_rate.append(n / t_ours)
                plain_rate.append(n / t_plain)
                c = method.stats()["counters"]
                empty = (c.get("skipped_empty", 0) + c.get("empty_selection_steps", 0)) / max(1, c["batches"])
                kept = c["kept"] / max(1, c["samples"])
                del method, plain
            ratios.sort()
            med = statistics.median(ratios)
            row = [name, str(bs), f"{statistics.median(ours_rate):,.0f}", f"{statistics.median(plain_rate):,.0f}",
                   f"{med:.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f})",
                   f"{empty:.0%}" if PLAIN[name] not in (PlainSource, PlainNorm, PlainTent) else "–",
                   f"{kept:.0%}" if name not in ("source", "norm") else "–"]
            print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="timm name (default: resnet50 on GPU, resnet18 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 on GPU, 16 on CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per method (default 30 GPU, 4 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU, 1 CPU; "
                                                                   "at least 3 for --fast: the compile)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 on GPU, 64 on CPU (ViTs: theirs)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (ours default column)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last (ours default column)")
    parser.add_argument("--compile", action="store_true", help="compiled step (ours default column)")
    parser.add_argument("--fast", action="store_true", help="add an 'ours fast' column: the fast preset "
                                                            "(bf16 + channels_last for CNNs + compiled step)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the networks (fast/compile)")
    parser.add_argument("--input-check", action="store_true",
                        help="ours with the default input check (NaN/range: one host sync per batch); off by "
                             "default, as the plain loops have none")
    parser.add_argument("--sync-check", type=int, default=3, help="CUDA: steps counted with the sync debug mode "
                                                                   "(0: off)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--data", choices=("random", "digits-c"), default="random",
                        help="random batches through a timm model (default), or a digits-C stream through a "
                             "shipped digits model")
    parser.add_argument("--batch-sizes", default=None, help="digits-c: comma-separated (default 1,4,16,64)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved comparisons from fresh copies (digits-c default 3; random: adds an "
                             "interleaved ours / official column)")
    parser.add_argument("--skip-empty", default="auto", choices=("never", "always", "auto"),
                        help="ours' skip_empty option (default auto)")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data == "digits-c":
        args.repeats = args.repeats or 3
        main_stream(args, device)
        return
    model = args.model or ("resnet50" if gpu else "resnet18")
    bs = args.batch_size or (64 if gpu else 16)
    iters = args.iters or (30 if gpu else 4)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    fast_warmup = max(warmup, 3)  # the first batch compiles, the second may compile a first-step-only branch
    size = args.image_size or (224 if gpu else 64)
    torch.manual_seed(0)
    base = build_net(model, args.num_classes, device, size)
    if base.fixed_input_size and base.info.input_size:
        size = base.info.input_size[0]
    gen = torch.Generator(device).manual_seed(0)
    xs = [torch.rand(bs, 3, size, size, device=device, generator=gen) for _ in range(4)]
    fisher_batches = [torch.rand(bs, 3, size, size, device=device, generator=gen) for _ in range(2)]
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else None
    checks = {} if args.input_check else {"nonfinite": "skip", "input_range": None}

    def ours(name: str):
        kwargs = {"fisher_data": fisher_batches} if name in ("eata", "eata_c") else {}
        method = methods.build(name, copy.deepcopy(base), batch_size=bs, skip_empty=args.skip_empty, **checks, **kwargs)
        if hasattr(method, "ensure_fisher"):
            method.ensure_fisher()  # not timed, as the plain loop's Fisher
        return method

    flags = [f for f, on in (("bf16", args.amp), ("channels_last", args.channels_last), ("compile", args.compile)) if on]
    dev = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{model} (random weights, head scaled), batch {bs}, {size}px, {iters} timed steps after {warmup} "
          f"({fast_warmup} for fast), {dev}, torch {torch.__version__}; ours default: {' + '.join(flags) or 'fp32 eager'}"
          f"{'' if args.input_check else ' (input check off)'}; ours fast: bf16 + "
          f"{'channels_last + ' if is_cnn(base.net) else ''}compiled step"
          f"{f' ({args.compile_mode})' if args.compile_mode else ''}; official-style: fp32 eager. "
          f"Peak memory: CUDA allocator (– on CPU). Syncs: synchronising CUDA calls per step (– on CPU).\n",
          flush=True)
    cols = ["method", "ours img/s"] + (["ours fast img/s"] if args.fast else []) + ["official-style img/s"]
    cols += ["ours MiB"] + (["ours fast MiB"] if args.fast else []) + ["official-style MiB", "ours / official"]
    cols += (["fast / ours", "fast compile s"] if args.fast else []) + ["syncs/step ours"]
    cols += (["syncs/step fast"] if args.fast else []) + ["kept (ours)"]
    cols += ["ours / official, interleaved (median, range)"] if args.repeats else []
    print("| " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * (len(cols) - 1), flush=True)

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method = ours(name).prepare(device=device, channels_last=args.channels_last, compile=args.compile,
                                    compile_mode=args.compile_mode)
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in xs] if args.channels_last else xs
        oi, om, _ = measure(method, inputs, iters, warmup, device, amp)
        osync = count_syncs(method, inputs, args.sync_check, device) if args.sync_check else None
        stats = method.stats()["counters"]
        kept = stats["kept"] / max(1, stats["samples"])
        del method
        fi = fm = fsec = fsync = None
        if args.fast:
            method = ours(name).prepare(device=device, fast=True, compile_mode=args.compile_mode)
            fi, fm, fsec = measure(method, xs, iters, fast_warmup, device)
            fsync = count_syncs(method, xs, args.sync_check, device) if args.sync_check else None
            del method
        pi = pm = None
        if name in PLAIN:
            extra = {"fisher_data": fisher_batches} if name == "eata" else {}
            lr = 1e-3 if name == "crowds" else methods.niu_learning_rate(
                "vit" if base.fixed_input_size else "cnn", bs, name in ("sar", "deyo"))
            plain = PLAIN[name](copy.deepcopy(base), lr, **extra)
            pi, pm, _ = measure(plain, xs, iters, warmup, device)
            del plain
        if gpu:
            torch.cuda.empty_cache()
        row = [name, fmt(oi, ",.0f")] + ([fmt(fi, ",.0f")] if args.fast else []) + [fmt(pi, ",.0f")]
        row += [fmt(om, ",.0f")] + ([fmt(fm, ",.0f")] if args.fast else []) + [fmt(pm, ",.0f")]
        row += [fmt(None if pi is None else oi / pi, ".2f") + ("" if pi is None else "×")]
        if args.fast:
            row += [fmt(fi / oi, ".2f") + "×", fmt(fsec, ".1f")]
        row += [fmt(osync, ".1f")] + ([fmt(fsync, ".1f")] if args.fast else []) + [f"{kept:.0%}"]
        if args.repeats:
            ratios = []
            for r in range(args.repeats if name in PLAIN else 0):
                method = ours(name).prepare(device=device, channels_last=args.channels_last, compile=args.compile,
                                            compile_mode=args.compile_mode)
                plain = PLAIN[name](copy.deepcopy(base), lr, **extra)
                stream = [inputs[i % len(inputs)] for i in range(warmup + iters)]
                t_ours, t_plain = interleaved([method, plain], stream, warmup, device)
                ratios.append(t_plain / t_ours)
                del method, plain
            ratios.sort()
            row += [f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f})" if ratios else "–"]
        print("| " + " | ".join(row) + " |", flush=True)
    if "eata_c" in args.methods:
        print("\neata_c has no official code (experimental): no official-style column.")
    if any(m in args.methods for m in ("rdumb", "lame", "cotta", "rotta", "sotta", "roid")):
        print("\nrdumb, lame, cotta, rotta, sotta, roid: no official-style loop here yet (their fidelity tests hold "
              "the official step); compare their img/s with tent's on the same model.")


if __name__ == "__main__":
    main()
