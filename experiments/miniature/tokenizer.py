"""A trained VQ tokenizer of the Janus architecture for the miniature, and its gate.

No pretrained tokenizer is reachable offline, and the first miniature's random, frozen VQ
encoder gave codes that behaved like a hash of patch texture: nothing image-dependent was
learnable from them (docs/experiments.md). Here the model's own `JanusVQVAE` (encoder,
`quant_conv`, codebook, `post_quant_conv`, decoder, built by trainer/adapters/janus/tiny.py at
the miniature's sizes) is trained as Janus's LlamaGen VQ-16 is, with an L2-normalised codebook:

- the encoder's latent vectors and the codebook rows are L2-normalised, and each latent takes its
  nearest row (`trainer.adapters.janus.adapter.nearest_codes`, the assignment the trainer uses);
- the decoder sees the normalised row (straight-through gradient to the encoder), as the
  decode path does (`get_codebook_entry` normalises);
- loss: pixel MSE + codebook term |sg(z) - e|^2 + 0.25 x commitment |z - sg(e)|^2, on the
  normalised vectors (LlamaGen's `VectorQuantizer` with `l2_norm`); a code unused for an epoch
  is restarted at a random current latent (so every code is used);
- data: the training scenes' images, depth targets and edge targets (the three kinds of image
  the generation tasks produce).

It is trained once per setting and cached (`vq.safetensors` beside a `vq.json` with its gate).

The gate (`vq_gate`, on held-out scenes):

- `entropy_given_position`: the entropy of a code given its grid position, against the codes'
  marginal entropy (`entropy`); a code that is predictable from where it is (and so from the
  image) has a conditional entropy well below the marginal: the random VQ's were 3.80 vs 4.1;
- `depth_order`: the fraction of held-out scenes whose depth target, encoded and decoded,
  still orders every pair of objects by depth (mean decoded brightness over each object's
  visible pixels; near is bright);
- `edge_f1`: the boundary F-score (1 px tolerance) of decoded edge targets against the exact
  ones; and the PSNR of decoded images.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["train_vq", "vq_gate"]


def _to_unit(x):
    return x.float().div(127.5).sub(1.0)


def train_vq(
    vq,
    targets: np.ndarray,
    steps: int,
    batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    log=None,
) -> dict[str, Any]:
    """Train `vq` (a JanusVQVAE, in place) on uint8 targets (N, 3, S, S); returns a summary."""
    import torch
    import torch.nn.functional as F

    from trainer.adapters.janus.adapter import nearest_codes

    g = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(targets)
    vq.train()
    params = [
        p
        for m in (vq.encoder, vq.quant_conv, vq.quantize, vq.post_quant_conv, vq.decoder)
        for p in m.parameters()
    ]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    book = vq.quantize.embedding.weight
    k = book.shape[0]
    used = torch.zeros(k, dtype=torch.bool)
    per_epoch = max(1, len(data) // batch)
    t0 = time.perf_counter()
    history = []
    for step in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        x = _to_unit(data[idx])
        h = vq.quant_conv(vq.encoder(x))
        b, c, hh, ww = h.shape
        z = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, c), dim=-1)
        e = F.normalize(book, dim=-1)
        codes = nearest_codes(h.detach(), book.detach()).flatten()
        zq = e[codes]
        codebook_loss = (zq - z.detach()).pow(2).sum(-1).mean()
        commit = (z - zq.detach()).pow(2).sum(-1).mean()
        zq_st = z + (zq - z).detach()
        zq_st = zq_st.view(b, hh, ww, c).permute(0, 3, 1, 2)
        recon = vq.decoder(vq.post_quant_conv(zq_st))
        rec_loss = F.mse_loss(recon, x)
        loss = rec_loss + codebook_loss + 0.25 * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # cosine decay over the run
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        used[codes] = True
        if (step + 1) % per_epoch == 0 and step + 1 < 0.8 * steps:
            dead = (~used).nonzero().flatten()
            if len(dead):  # restart unused codes at random current latents
                with torch.no_grad():
                    pick = torch.randint(len(z), (len(dead),), generator=g)
                    book[dead] = z.detach()[pick] * book.detach().norm(dim=-1).mean()
            used.zero_()
        if (step + 1) % 100 == 0 or step == steps - 1:
            history.append({"step": step + 1, "recon_mse": rec_loss.item(), "loss": loss.item()})
            if log:
                log(
                    f"tokenizer step {step + 1}/{steps}: pixel MSE {rec_loss.item():.4f} "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
    vq.eval()
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1), "history": history}


def encode(vq, images: np.ndarray):
    """uint8 (N, 3, S, S) -> codes (N, M) int64, as the trainer assigns them."""
    import torch

    from trainer.adapters.janus.adapter import nearest_codes

    with torch.no_grad():
        out = []
        for s in range(0, len(images), 256):
            x = _to_unit(torch.from_numpy(images[s : s + 256]))
            out.append(nearest_codes(vq.quant_conv(vq.encoder(x)), vq.quantize.embedding.weight))
        return torch.cat(out)


def decode(vq, codes) -> np.ndarray:
    """codes (N, M) -> uint8 images (N, 3, S, S), through the model's own decode path."""
    import torch

    with torch.no_grad():
        out = []
        for s in range(0, len(codes), 256):
            px = vq.decode(codes[s : s + 256])
            out.append(((px.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
        return torch.cat(out).numpy()


def code_entropies(codes, k: int) -> dict[str, float]:
    """Marginal entropy of the codes and their entropy given the grid position (nats), from
    their empirical frequencies over (N, M) codes."""
    c = codes.numpy()
    p = np.bincount(c.ravel(), minlength=k) / c.size
    marginal = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    cond = 0.0
    for j in range(c.shape[1]):
        q = np.bincount(c[:, j], minlength=k) / c.shape[0]
        cond += float(-(q[q > 0] * np.log(q[q > 0])).sum())
    return {"entropy": marginal, "entropy_given_position": cond / c.shape[1]}


def _edge_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """Boundary F-score with 1 px tolerance, over a batch of binary maps (N, S, S)."""
    import cv2

    kernel = np.ones((3, 3), np.uint8)
    tp_p = tp_t = n_p = n_t = 0
    for p, t in zip(pred, true):
        near_t = cv2.dilate(t.astype(np.uint8), kernel).astype(bool)
        near_p = cv2.dilate(p.astype(np.uint8), kernel).astype(bool)
        tp_p += int((p & near_t).sum())
        tp_t += int((t & near_p).sum())
        n_p += int(p.sum())
        n_t += int(t.sum())
    precision, recall = tp_p / max(1, n_p), tp_t / max(1, n_t)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def vq_gate(vq, scenes: list, k: int) -> dict[str, Any]:
    """The tokenizer's gate on held-out scenes (module docstring)."""
    from experiments.miniature.labels import vq_training_targets

    t = vq_training_targets(scenes)
    images, depth, edges = t[0::3], t[1::3], t[2::3]
    out: dict[str, Any] = {}
    for name, arr in (("image", images), ("depth", depth), ("edges", edges)):
        out[name] = code_entropies(encode(vq, arr), k)
    all_codes = encode(vq, t)
    out["all"] = code_entropies(all_codes, k)
    out["codes_used"] = int(np.unique(all_codes.numpy()).size)
    dec_img = decode(vq, encode(vq, images)).astype(np.float64)
    mse = float(((dec_img - images) ** 2).mean())
    out["image_psnr"] = 10 * math.log10(255.0**2 / max(mse, 1e-9))
    dec_depth = decode(vq, encode(vq, depth))[:, 0].astype(np.float64)
    kept = 0
    for sc, d in zip(scenes, dec_depth):
        means = [d[m].mean() for m in sc.masks]
        zs = [o["z"] for o in sc.objects]
        order_ok = all(
            (means[a] > means[b]) == (zs[a] < zs[b])
            for a in range(len(zs))
            for b in range(a + 1, len(zs))
        )
        kept += order_ok
    out["depth_order"] = kept / len(scenes)
    dec_edges = decode(vq, encode(vq, edges))[:, 0] > 127
    out["edge_f1"] = _edge_f1(dec_edges, edges[:, 0] > 127)
    return out


def save_vq(vq, folder: Path, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from pipeline.shards import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in vq.state_dict().items()}
    tmp = folder / "vq.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.rename(folder / "vq.safetensors")
    atomic_write_bytes(folder / "vq.json", json.dumps(record, indent=2).encode())


def load_vq(vq, folder: Path) -> dict[str, Any] | None:
    """Load a cached tokenizer into `vq`; its record, or None when there is none."""
    from safetensors.torch import load_file

    if not (folder / "vq.json").is_file() or not (folder / "vq.safetensors").is_file():
        return None
    vq.load_state_dict(load_file(str(folder / "vq.safetensors")))
    vq.eval()
    return json.loads((folder / "vq.json").read_text())
