"""The official prompt-tuning step of azshue/TPT (``tpt_classification.py``: ``select_confident_samples``,
``avg_entropy``, ``test_time_tuning``; ``clip/custom_clip.py``: ``ClipTestTimeTuning``), written for the
tiny open_clip model of ``tiny_clip.py``, and C-TPT's additions (hee-suk-yoon/C-TPT: the
``l2_norm_cal`` dispersion of the text features, ``custom_clip.py:320-330``, and its loss term).
Shared by ``test_tpt.py`` and ``test_ctpt.py``; a helper module, not a test module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLASSES = ["goldfish", "red fox", "tabby cat", "great white shark", "axolotl"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def official_select(logits, top):
    """``select_confident_samples``: the ``top`` share of the views with the lowest entropy."""
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    idx = torch.argsort(entropy, descending=False)[: int(entropy.size()[0] * top)]
    return logits[idx], idx


def official_avg_entropy(outputs):
    """``avg_entropy``: the entropy of the views' mean probability, in log space."""
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg = logits.logsumexp(dim=0) - math.log(logits.shape[0])
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * torch.exp(avg)).sum(dim=-1)


class OfficialPromptCLIP:
    """``ClipTestTimeTuning`` on the same open_clip weights: 77-token prompts, no truncation. With
    ``l2_norm_cal`` (C-TPT) each call also keeps ``l2_norm_mean_training``, the mean distance of the
    normalised text features to their mean."""

    def __init__(self, clip, tokenizer, names, l2_norm_cal: bool = False):
        self.clip, self.l2_norm_cal = clip, l2_norm_cal
        tokens = tokenizer([f"a photo of a {n}." for n in names])
        with torch.no_grad():
            init = clip.token_embedding(tokenizer(["a photo of a"]))[0, 1:5].clone()
            emb = clip.token_embedding(tokens)
        self.tokens, self.prefix, self.suffix = tokens, emb[:, :1], emb[:, 5:]
        self.ctx_init_state = init
        self.ctx = torch.nn.Parameter(init.clone())

    def text_features(self):
        prompts = torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(len(self.tokens), -1, -1), self.suffix], 1)
        x = prompts + self.clip.positional_embedding
        x = self.clip.ln_final(self.clip.transformer(x, attn_mask=self.clip.attn_mask))
        x = x[torch.arange(x.shape[0]), self.tokens.argmax(dim=-1)] @ self.clip.text_projection
        return F.normalize(x, dim=-1)

    def __call__(self, images):
        with torch.no_grad():
            image = F.normalize(self.clip.encode_image((images - MEAN) / STD), dim=-1)
        text = self.text_features()
        if self.l2_norm_cal:  # [c-tpt]: custom_clip.py:320-330
            self.l2_norm_mean_training = torch.linalg.norm(text - text.mean(0), dim=-1).mean()
        return self.clip.logit_scale.exp() * image @ text.T


def _reset(model, optimizer, optim_state):
    with torch.no_grad():
        model.ctx.copy_(model.ctx_init_state)
    optimizer.load_state_dict(optim_state)


def _update(loss, optimizer, scaler):
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def official_tpt(model, views, optimizer, optim_state, scaler, selection=0.1, steps=1):
    """``test_time_adapt_eval`` for one image: reset, tune, predict on view 0."""
    _reset(model, optimizer, optim_state)
    selected = None
    for _ in range(steps):
        output = model(views)
        if selected is not None:
            output = output[selected]
        else:
            output, selected = official_select(output, selection)
        loss = official_avg_entropy(output)
        _update(loss, optimizer, scaler)
    with torch.no_grad():
        return model(views[:1]), selected, loss


def official_ctpt(model, views, optimizer, optim_state, scaler, lambda_, selection=0.1):
    """C-TPT: reset, ``test_time_tuning`` with run_type tpt_ctpt and one step (the entropy of the
    selected views minus ``lambda_`` times the dispersion), then predict on view 0."""
    _reset(model, optimizer, optim_state)
    output, selected = official_select(model(views), selection)
    loss = official_avg_entropy(output)
    loss += (-lambda_ * model.l2_norm_mean_training)
    _update(loss, optimizer, scaler)
    with torch.no_grad():
        return model(views[:1]), selected, loss
