#!/usr/bin/env python
"""Per-image latency of TPT and ADTE on CLIP: ours beside a loop written like the official code;
ZERO, TDA and C-TPT (ours only) in the same table, on the same images, next to TPT.

    python scripts/bench_clip.py                                   # CPU, a tiny random CLIP (seconds)
    python scripts/bench_clip.py --arch ViT-B-16 --device cuda     # the real architecture, random weights

Both sides see the same views of the same images and take the same steps. The official-style loops
follow azshue/TPT (``tpt_classification.py``: fp32 weights, fp16 autocast on CUDA, GradScaler with
init scale 1000, 77-token prompts, 64 views encoded, then view 0 encoded again with the tuned prompt)
and Jinx630/ADTE (``ttas/zero.py``: the 64 views encoded under autocast, cached text features, the
ADTE score, sum of softmax over the 6 kept views). Their views come ready-made (the official data
loaders make them in worker processes); ours are made on the device inside the timed call. Ours runs
under bf16 autocast on CUDA (``--amp none`` for fp32). Printed: one table with milliseconds per
image (median over the timed images), the speed-up, peak GPU memory and the largest difference
between the two predicted probability vectors (bf16 against fp16 autocast on CUDA; with random
weights every class is almost equally likely, so compare predicted classes only with real weights).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", help="open_clip architecture, or 'tiny' for the test model")
    p.add_argument("--pretrained", default="none", help="pretrained tag or checkpoint file (default: random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--classes", type=int, default=1000, help="number of classes (ImageNet names)")
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--images", type=int, default=None, help="timed images (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed images first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--amp", choices=("bf16", "none"), default=None, help="our autocast (default: bf16 on CUDA)")
    p.add_argument("--methods", default="tpt,adte,zeroshot,zero,ctpt,tda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (tiny models: 1 avoids oversubscription)")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def timed(fn, inputs, device, warmup):
    """Median ms per call over ``inputs[warmup:]``, the outputs, and the peak memory (MiB)."""
    outs = []
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, item in enumerate(inputs):
        sync(device)
        start = time.perf_counter()
        out = fn(item)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
            outs.append(out.detach().float().cpu())
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), torch.cat(outs), peak


# ----------------------------------------------------------------------------- official-style loops
class OfficialTPT:
    """azshue/TPT's ``test_time_tuning`` + prediction, on the same open_clip weights."""

    def __init__(self, net, device, amp_dtype):
        clip = net.clip
        self.clip, self.device, self.amp_dtype = clip, device, amp_dtype
        names = [n.replace("_", " ") for n in net.class_names]
        tokens = net.tokenizer([f"a photo of a {n}." for n in names]).to(device)
        with torch.no_grad():
            init = clip.token_embedding(net.tokenizer(["a photo of a"]).to(device))[0, 1:5].clone()
            emb = clip.token_embedding(tokens)
        self.tokens, self.prefix, self.suffix = tokens, emb[:, :1], emb[:, 5:]
        self.ctx_init = init
        self.ctx = torch.nn.Parameter(init.clone())
        self.optimizer = torch.optim.AdamW([self.ctx], 5e-3)
        self.optim_state = self.optimizer.state_dict()
        self.scaler = torch.amp.GradScaler(device.type, init_scale=1000, enabled=device.type == "cuda")
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)

    def text_features(self):
        prompts = torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(len(self.tokens), -1, -1), self.suffix], 1)
        x = prompts + self.clip.positional_embedding
        x = self.clip.ln_final(self.clip.transformer(x, attn_mask=self.clip.attn_mask))
        x = x[torch.arange(x.shape[0], device=x.device), self.tokens.argmax(dim=-1)] @ self.clip.text_projection
        return x / x.norm(dim=-1, keepdim=True)

    def model(self, images):
        with torch.no_grad():
            image = self.clip.encode_image((images - self.mean) / self.std)
            image = image / image.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * image @ self.text_features().t()

    def __call__(self, views):
        with torch.no_grad():
            self.ctx.copy_(self.ctx_init)
        self.optimizer.load_state_dict(self.optim_state)
        with autocast(self.device, self.amp_dtype):
            output = self.model(views)
            entropy = -(output.softmax(1) * output.log_softmax(1)).sum(1)
            idx = torch.argsort(entropy, descending=False)[:max(int(entropy.size()[0] * 0.1), 1)]  # (max: V < 10)
            output = output[idx]
            logits = output - output.logsumexp(dim=-1, keepdim=True)
            avg = logits.logsumexp(dim=0) - math.log(logits.shape[0])
            avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
            loss = -(avg * torch.exp(avg)).sum(dim=-1)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            return self.model(views[:1])


class OfficialADTE:
    """Jinx630/ADTE's ``Zero.zero`` with ``--use_adte`` and a pre-computed bias."""

    def __init__(self, net, device, amp_dtype, scale_w):
        self.net, self.device, self.amp_dtype, self.scale_w = net, device, amp_dtype, scale_w
        with torch.no_grad():
            self.z_txt = net.template_features()
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, views):
        with autocast(self.device, self.amp_dtype):
            z_img = self.net.clip.encode_image((views - self.mean) / self.std)
            z_img = z_img / z_img.norm(dim=-1, keepdim=True)
            logits = z_img @ self.z_txt.t() * self.net.clip.logit_scale.exp()
            prob = logits.softmax(1)
            score = torch.sum(torch.pow(prob, self.scale_w) / (1 - self.scale_w), dim=1)
            keep = torch.argsort(score, descending=False)[:max(int(score.size()[0] * 0.1), 1)]
            return logits[keep].softmax(1).sum(0, keepdim=True)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    n_images = args.images or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    ours_dtype = {"bf16": torch.bfloat16, "none": None}[args.amp or ("bf16" if cuda else "none")]
    official_dtype = torch.float16 if cuda else None
    if cuda:
        torch.backends.cudnn.benchmark = True

    from tta.methods import build
    from tta.objectives import views_kept as keep_count
    from tta.models.clip import load_clip_classifier
    from tta.models.clip_classnames import IMAGENET_CLASSES

    names = [IMAGENET_CLASSES[i % 1000] + ("" if i < 1000 else f" {i // 1000}") for i in range(args.classes)]
    tmp = tempfile.TemporaryDirectory()
    if args.arch == "tiny":
        from tiny_clip import build_tiny_clip

        spec = build_tiny_clip(tmp.name, logit_scale=100.0)[5:]
    else:
        spec = f"{args.arch}/{args.pretrained}"

    def classifier():
        return load_clip_classifier(spec, class_names=names, pretrained=args.pretrained not in ("none", "random"),
                                    device=device).to(device)

    size = classifier().input_size[0] if args.arch == "tiny" else 224
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, size, size, generator=gen).to(device) for _ in range(n_images + warmup)]
    rows = []
    wanted = args.methods.split(",")

    def ids(i):
        return [i]

    def time_ours(method):
        """Our method on each image (ids in order), and the same views for the official-style loop."""
        views = [method.views(x, ids=ids(i))[0] for i, x in enumerate(images)]
        counter = iter(range(10**9))

        def ours(x):
            with autocast(device, ours_dtype):
                return method(x, ids=ids(next(counter)))

        return (views, *timed(ours, images, device, warmup))

    if "zeroshot" in wanted:
        clf = classifier()
        with torch.no_grad(), autocast(device, ours_dtype):
            clf.text_features()
            ms, _, peak = timed(lambda x: clf(x), images, device, warmup)
        rows.append(("zero-shot CLIP, batch 1", ms, None, None, peak, None, None))
        del clf

    if "tpt" in wanted:
        method = build("tpt", classifier(), num_views=args.views).to(device)
        views, ms, ours_out, peak = time_ours(method)
        official = OfficialTPT(classifier().net, device, official_dtype)
        ms_o, off_out, peak_o = timed(official, views, device, warmup)
        agree = (ours_out.softmax(1) - off_out.softmax(1)).abs().max().item()
        rows.append((f"TPT ({args.views} views, 1 step)", ms, ms_o, ms_o / ms, peak, peak_o, agree))  # agree: max |p_ours - p_official|
        del method, official

    if "adte" in wanted:
        method = build("adte", classifier(), num_views=args.views, bias="uniform").to(device)
        b = torch.log(torch.linspace(1, 3, len(names), device=device))
        method.use_bias(b)
        views, ms, ours_out, peak = time_ours(method)
        official = OfficialADTE(classifier().net, device, official_dtype, method.ranking.q_index.clone())
        ms_o, off_out, peak_o = timed(official, views, device, warmup)
        agree = (ours_out.exp() - off_out / keep_count(args.views, 0.1)).abs().max().item()
        rows.append((f"ADTE ({args.views} views, bias given)", ms, ms_o, ms_o / ms, peak, peak_o, agree))  # agree: max |p_ours - p_official|

    # ours only (the reference loops are not re-timed here; their fidelity is tested in tests/)
    if "zero" in wanted:
        _, ms, _, peak = time_ours(build("zero", classifier(), num_views=args.views).to(device))
        rows.append((f"ZERO ({args.views} views, vote)", ms, None, None, peak, None, None))
    if "ctpt" in wanted:
        _, ms, _, peak = time_ours(build("ctpt", classifier(), num_views=args.views).to(device))
        rows.append((f"C-TPT ({args.views} views, 1 step)", ms, None, None, peak, None, None))
    if "tda" in wanted:
        _, ms, _, peak = time_ours(build("tda", classifier()).to(device))
        rows.append(("TDA (1 view: ImageNet setting, caches)", ms, None, None, peak, None, None))
        _, ms, _, peak = time_ours(build("tda", classifier(), num_views=args.views, augmix=True).to(device))
        rows.append((f"TDA ({args.views} AugMix views: natural shifts, caches)", ms, None, None, peak, None, None))

    dev_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nCLIP {args.arch} ({args.pretrained}), {len(names)} classes, {args.views} views, {n_images} timed images "
          f"after {warmup} warm-up, {dev_name}; ours: {args.amp or ('bf16' if cuda else 'none')} autocast, "
          f"official-style: {'fp16 autocast' if cuda else 'fp32'}\n")
    print("| method | ours ms/img | official-style ms/img | speed-up | ours peak MiB | official peak MiB | max abs diff of p |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for name, ms, ms_o, speed, peak, peak_o, agree in rows:
        print(f"| {name} | {ms:.1f} | {fmt(ms_o, '.1f')} | {fmt(speed, '.2f')}{'x' if speed else ''} | "
              f"{fmt(peak, '.0f')} | {fmt(peak_o, '.0f')} | {fmt(agree, '.1e')} |")


if __name__ == "__main__":
    main()
