"""Training the toy model (``model=toy``): an SD-1.5-shaped VAE, UNet and text encoder learnt on
the procedural world of :mod:`dragexp.data.toyworld`.

Two LightningModules, trained one after the other by ``scripts/train_toy_model.py``:

* :class:`ToyVAETraining`: the autoencoder (8x down, 4 latent channels), L1 + MSE
  reconstruction and a small KL term (the latent-diffusion recipe without the adversarial loss,
  which simple flat-shaded scenes do not need), on random crops (the VAE is convolutional, so
  crops teach it the same local code at a quarter of the cost); after the UNet, the same module
  fine-tunes the decoder alone on the frozen encoder's latents;
* :class:`ToyUNetTraining`: the noise-prediction UNet and the text encoder, the DDPM
  epsilon objective (Ho et al. 2020, eq. 14) on SD 1.5's ``scaled_linear`` schedule
  (:func:`dragexp.core.schedule.sd_alphas_cumprod`, the schedule every method inverts and samples
  with), captions dropped 10% of the time so classifier-free guidance has an unconditional
  branch to use.

The architectures are SD 1.5's (:func:`toy_unet_config`, :func:`toy_vae_config`) at small width,
and the result is saved as a diffusers folder, so it loads through the same classes and code
path as real SD 1.5 weights (:func:`dragexp.models.load_local`).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dragexp.data.toyworld import COLOURS, SHAPES, caption, random_scene, render
from dragexp.models.tiny import _bytes_to_unicode, clip_text_config, sd_unet_config, sd_vae_config

from ..core.schedule import sd_alphas_cumprod

TEXT_WIDTH = 64


def toy_vae_config(resolution: int = 128) -> dict:
    """``AutoencoderKL`` kwargs: SD's VAE layout (4 levels, 8x down, 4 latent channels) at small width."""
    return sd_vae_config((32, 64, 128, 128), 1, 16, resolution)


def toy_unet_config(resolution: int = 128) -> dict:
    """``UNet2DConditionModel`` kwargs: SD 1.5's topology (16 transformer blocks, 4 levels,
    ``layers_per_block=2``) at widths 32-64-64-64."""
    return sd_unet_config((32, 64, 64, 64), TEXT_WIDTH, 32, resolution)


def _world_words() -> list[str]:
    return sorted(set(COLOURS) | set(SHAPES) | {"a", "an", "and", "on", "background", "striped"})


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word's symbols: merge the best-ranked adjacent pair until none applies."""
    while len(word) > 1:
        pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(zip(word, word[1:]))]
        rank, _ = min(pairs)
        if rank == math.inf:
            break
        first, second = [p for p, r in ranks.items() if r == rank][0]
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def build_world_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose merges make every word of the toy world's captions
    one token (any other text still tokenizes, byte by byte), loaded from files as CLIP's is.

    Each word's merges are found by running BPE on it with the merges made so far and adding
    the merge of its first two symbols until it is one token; a merge added last has the lowest
    priority, so it never changes how an earlier word splits.
    """
    chars = list(_bytes_to_unicode().values())
    ranks: dict[tuple[str, str], int] = {}
    for word in _world_words():
        while len(symbols := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
    merges = sorted(ranks, key=ranks.get)
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="dragexp_tokenizer_") as folder:
        root = Path(folder)
        (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges)
                                         + "\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def build_toy_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A two-layer CLIP text transformer of width 64 for the world tokenizer."""
    return CLIPTextModel(CLIPTextConfig(**clip_text_config(
        len(tokenizer), TEXT_WIDTH, layers=2, heads=4, ffn=2 * TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)))


class ToySceneStream(torch.utils.data.IterableDataset):
    """Endless random toy-world scenes: ``(image in [-1, 1] (3, H, W), caption)``.

    Scene ``k`` of worker ``w`` comes from the generator seeded ``(seed, w, k)``, so a run with
    the same seed and worker count sees the same images in the same order. ``crop`` takes a
    random ``crop x crop`` window (for the VAE).
    """

    def __init__(self, seed: int, size: tuple[int, int] = (128, 128), crop: int | None = None):
        self.seed, self.size, self.crop = int(seed), tuple(size), crop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        k = 0
        while True:
            rng = np.random.default_rng([self.seed, worker, k])
            scene = random_scene(rng)
            h, w = self.size
            img = render(scene, h, w)
            if self.crop:
                y = int(rng.integers(0, h - self.crop + 1))
                x = int(rng.integers(0, w - self.crop + 1))
                img = img[y:y + self.crop, x:x + self.crop]
            yield torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0, caption(scene)
            k += 1


class ToyVAETraining(L.LightningModule):
    """Fits :class:`AutoencoderKL` to toy-world images: ``|x - x'|_1 + |x - x'|_2^2 + kl * KL``.

    With ``vae`` given and ``decoder_only``, the decoder alone is fine-tuned on the frozen
    encoder's posterior means (the latents inversion starts from): the latents the UNet learnt
    do not move, and reconstruction keeps improving (as SD's ft-MSE decoder was made).
    """

    def __init__(self, resolution: int = 128, lr: float = 1e-3, kl_weight: float = 1e-6,
                 steps: int = 1000, vae: AutoencoderKL | None = None, decoder_only: bool = False):
        super().__init__()
        self.decoder_only = decoder_only
        if vae is None:
            vae = AutoencoderKL(**toy_vae_config(resolution))
            # Posterior log-variances start near -10 (std ~0.007) instead of 0: with a KL
            # weight this small, unit-variance sampling noise would drown the code for hundreds
            # of steps, and the posterior stays as narrow as SD's (LoRA training samples it).
            with torch.no_grad():
                vae.quant_conv.bias[vae.config.latent_channels:] = -10.0
        self.vae = vae
        if decoder_only:
            self.vae.requires_grad_(False)
            for part in (self.vae.decoder, self.vae.post_quant_conv):
                part.requires_grad_(True)
        self.lr, self.kl_weight, self.steps = lr, kl_weight, steps

    def training_step(self, batch, _):
        x, _captions = batch
        if self.decoder_only:
            with torch.no_grad():
                z = self.vae.encode(x).latent_dist.mean
            kl = torch.zeros((), device=x.device)
        else:
            posterior = self.vae.encode(x).latent_dist
            z = posterior.sample()
            kl = posterior.kl().mean() / x[0].numel()
        recon = self.vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        mse = (recon - x).pow(2).mean()
        loss = l1 + mse + self.kl_weight * kl
        psnr = 10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))
        self.log_dict({"vae/loss": loss, "vae/l1": l1, "vae/psnr": psnr}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.vae.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _cosine_warmup(opt, self.steps),
                                                    "interval": "step"}}


class ToyUNetTraining(L.LightningModule):
    """Fits the UNet and text encoder to VAE latents with the DDPM epsilon objective.

    Latents are given already scaled (``vae.config.scaling_factor`` applied). Timesteps are
    uniform over SD's 1000 training steps.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, lr: float = 5e-4, text_lr: float = 2e-4,
                 caption_dropout: float = 0.1, steps: int = 1000):
        super().__init__()
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.lr, self.text_lr, self.caption_dropout, self.steps = lr, text_lr, caption_dropout, steps
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod(), persistent=False)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(captions), padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def training_step(self, batch, _):
        z0, captions = batch
        captions = ["" if torch.rand(()) < self.caption_dropout else c for c in captions]
        t = torch.randint(0, 1000, (z0.shape[0],), device=z0.device)
        noise = torch.randn_like(z0)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        eps = self.unet(zt, t, self.encode_text(captions)).sample
        loss = F.mse_loss(eps.float(), noise)
        self.log("unet/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW([
            {"params": self.unet.parameters(), "lr": self.lr},
            {"params": self.text_encoder.parameters(), "lr": self.text_lr},
        ], weight_decay=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _cosine_warmup(opt, self.steps),
                                                    "interval": "step"}}


class CachedLatents(torch.utils.data.Dataset):
    """Scaled VAE latents (posterior means) of fixed scenes, with their captions."""

    def __init__(self, latents: torch.Tensor, captions: list[str]):
        self.latents, self.captions = latents, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i):
        return self.latents[i], self.captions[i]


def _cosine_warmup(opt, steps: int, warmup: int = 50):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, seed: int, count: int, size: tuple[int, int],
                  batch: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Posterior-mean latents (unscaled) and captions of ``count`` scenes seeded ``(seed, k)``,
    then of their mirror images (a mirrored scene is a scene of the same world, same caption):
    ``2 * count`` latents."""
    vae.eval()
    latents, mirrored, captions = [], [], []
    for start in range(0, count, batch):
        images = []
        for k in range(start, min(count, start + batch)):
            scene = random_scene(np.random.default_rng([seed, 1_000_003, k]))
            images.append(torch.from_numpy(render(scene, *size)).permute(2, 0, 1).float())
            captions.append(caption(scene))
        x = torch.stack(images) / 127.5 - 1.0
        z = vae.encode(torch.cat([x, x.flip(-1)]).to(vae.device)).latent_dist.mean.float().cpu()
        latents.append(z[:len(images)])
        mirrored.append(z[len(images):])
    return torch.cat(latents + mirrored), captions + captions


def _precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


class _PrintProgress(L.Callback):
    """One plain line every ``every`` steps (step, logged metrics, elapsed seconds), readable
    in a log file where a progress bar is not."""

    def __init__(self, every: int = 50):
        self.every = every

    def on_train_batch_end(self, trainer, *_):
        import time

        if not hasattr(self, "_t0"):
            self._t0 = time.perf_counter()
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            vals = " ".join(f"{k} {float(v):.4f}" for k, v in trainer.callback_metrics.items())
            print(f"step {step}/{trainer.max_steps} {vals} "
                  f"({time.perf_counter() - self._t0:.0f} s)", flush=True)


def _fit(module: L.LightningModule, loader, steps: int) -> float:
    """Fits ``module`` for ``steps`` steps; returns the seconds it took."""
    import time

    start = time.perf_counter()
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, precision=_precision(), accelerator="auto",
                        devices=1, log_every_n_steps=25, num_sanity_val_steps=0,
                        enable_progress_bar=False, callbacks=[_PrintProgress()])
    trainer.fit(module, loader)
    return time.perf_counter() - start


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, seed: int, count: int, size: tuple[int, int]) -> float:
    """Mean PSNR (dB, images in 0..255 after rounding) of ``decode(encode(x))`` over held-out scenes."""
    vae.eval()
    psnrs = []
    for k in range(count):
        img = render(random_scene(np.random.default_rng([seed, 2_000_029, k])), *size)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float().to(vae.device) / 127.5 - 1.0
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        y = ((y[0].permute(1, 2, 0).float().cpu() + 1) * 127.5).round()
        mse = ((y - torch.from_numpy(img).float()) ** 2).mean().item()
        psnrs.append(10 * math.log10(255.0 ** 2 / max(mse, 1e-10)))
    return float(np.mean(psnrs))


def train_toy_model(cfg, command: str, work_dir: str | Path = ".") -> Path:
    """Trains VAE, then UNet + text encoder, and writes the diffusers folder ``cfg.out`` with a
    model card (``README.md``: command, seed, steps, wall time, losses) and ``training.json``.

    The VAE is saved after each training cycle to ``<work_dir>/vae_<k>``;
    ``cfg.vae.load=<such a folder>`` goes on from it (its figures are read from the folder's
    ``vae_training.json``).
    """
    import platform
    import time

    from dragexp.models.bundle import ModelBundle
    from dragexp.models.pretrained import save_bundle

    t0 = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True)
    size = (int(cfg.resolution), int(cfg.resolution))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # The VAE trains in cycles of a warm-up + cosine schedule, each with a fresh optimiser and
    # fresh scenes (warm restarts): a cycle's VAE is saved to <work_dir>/vae_<k>, and
    # vae.load=<such a folder> goes on from it with the cycles still to run.
    cycles = [int(c) for c in (cfg.vae.steps if not isinstance(cfg.vae.steps, int)
                               else [cfg.vae.steps])]
    vae, done, history = None, 0, []
    previous = None
    if cfg.get("init"):
        # Going on from a finished toy model: its VAE (and so its latent space and scaling
        # factor) stays as it is, and its UNet and text encoder train a further cycle.
        init = Path(str(cfg.init))
        if not (init / "training.json").is_file():
            raise FileNotFoundError(f"init={init}: not a toy model folder (no training.json); "
                                    "pass a folder written by scripts/train_toy_model.py")
        previous = json.loads((init / "training.json").read_text())
        from dragexp.models.toy import load_toy

        start = load_toy(str(init))
        vae = start.vae
        history = previous["vae_cycles"]
        cycles, done = [h["steps"] for h in history], len(history)
    elif cfg.vae.get("load"):
        vae = AutoencoderKL.from_pretrained(str(cfg.vae.load), torch_dtype=torch.float32)
        history = json.loads((Path(cfg.vae.load) / "vae_training.json").read_text())["cycles"]
        done = len(history)
        if [h["steps"] for h in history] != cycles[:done]:
            raise ValueError(f"vae.load={cfg.vae.load} ran cycles of "
                             f"{[h['steps'] for h in history]} steps, which do not begin "
                             f"vae.steps={cycles}: pass the same vae.* settings")
    for k in range(done, len(cycles)):
        L.seed_everything(int(cfg.seed) + 10 * k, workers=True)
        module = ToyVAETraining(cfg.resolution, lr=cfg.vae.lr, kl_weight=cfg.vae.kl_weight,
                                steps=cycles[k], vae=vae)
        loader = torch.utils.data.DataLoader(
            ToySceneStream(int(cfg.seed) + 10 * k, size, crop=cfg.vae.crop),
            batch_size=cfg.vae.batch_size)
        seconds = _fit(module, loader, cycles[k])
        vae = module.vae.to(device).eval()
        psnr = reconstruction_psnr(vae, cfg.seed, 64, size)
        history.append({"steps": cycles[k], "seconds": seconds, "heldout_psnr_db": psnr})
        print(f"VAE cycle {k + 1}/{len(cycles)}: {cycles[k]} steps in {seconds:.0f} s, held-out "
              f"reconstruction {psnr:.2f} dB", flush=True)
        saved = Path(work_dir) / f"vae_{k + 1}"
        vae.save_pretrained(str(saved))
        (saved / "vae_training.json").write_text(json.dumps({"cycles": history}))
    vae = vae.to(device).eval().requires_grad_(False)
    vae_seconds = sum(h["seconds"] for h in history)
    vae_psnr = history[-1]["heldout_psnr_db"]

    t_enc = time.perf_counter()
    # A further UNet stage sees scenes the earlier stages did not.
    stage = len(previous.get("unet_stages") or [1]) if previous else 0
    latents, captions = encode_scenes(vae, int(cfg.seed) + 1000 * stage, cfg.unet.scenes, size)
    if previous is None:
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
    else:
        scaling = float(vae.config.scaling_factor)
    encode_seconds = time.perf_counter() - t_enc
    print(f"encoded {latents.shape[0]} latents in {encode_seconds:.0f} s; scaling factor "
          f"{scaling:.5f}", flush=True)

    # Seeded again so a run that loads its VAE trains the same UNet as one that trained it.
    L.seed_everything(int(cfg.seed) + 1, workers=True)
    tokenizer = build_world_tokenizer()
    if previous is None:
        text_encoder = build_toy_text_encoder(tokenizer)
        unet = UNet2DConditionModel(**toy_unet_config(cfg.resolution))
    else:
        # The loaded bundle comes frozen and in eval mode, as for editing; training needs both
        # undone.
        text_encoder = start.text_encoder.train().requires_grad_(True)
        unet = start.unet.train().requires_grad_(True)
    unet_module = ToyUNetTraining(unet, text_encoder, tokenizer, lr=cfg.unet.lr,
                                  text_lr=cfg.unet.text_lr,
                                  caption_dropout=cfg.unet.caption_dropout, steps=cfg.unet.steps)
    unet_loader = torch.utils.data.DataLoader(
        CachedLatents(latents * scaling, captions), batch_size=cfg.unet.batch_size, shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(int(cfg.seed)))
    unet_seconds = _fit(unet_module, unet_loader, cfg.unet.steps)
    final_loss = float(unet_module.trainer.callback_metrics.get("unet/loss", float("nan")))
    print(f"UNet: {cfg.unet.steps} steps in {unet_seconds:.0f} s, last loss {final_loss:.4f}",
          flush=True)

    decoder_seconds, decoder_psnr = 0.0, vae_psnr
    if int(cfg.vae.decoder_steps) > 0:
        L.seed_everything(int(cfg.seed) + 2, workers=True)
        vae.train()
        dec_module = ToyVAETraining(lr=cfg.vae.lr, steps=cfg.vae.decoder_steps, vae=vae,
                                    decoder_only=True)
        dec_loader = torch.utils.data.DataLoader(
            ToySceneStream(int(cfg.seed) + 2, size, crop=cfg.vae.crop),
            batch_size=cfg.vae.batch_size)
        decoder_seconds = _fit(dec_module, dec_loader, cfg.vae.decoder_steps)
        vae = dec_module.vae.to(device).eval().requires_grad_(False)
        decoder_psnr = reconstruction_psnr(vae, cfg.seed, 64, size)
        print(f"decoder: {cfg.vae.decoder_steps} steps in {decoder_seconds:.0f} s, held-out "
              f"reconstruction {decoder_psnr:.2f} dB", flush=True)

    bundle = ModelBundle(unet.cpu(), vae.cpu(), text_encoder.cpu(), tokenizer,
                         resolution=int(cfg.resolution), source="toy")
    if cfg.save_fp16:
        bundle.to("cpu", torch.float16)
    out = save_bundle(bundle, cfg.out)
    # A loaded VAE's stage ran in an earlier process; its time belongs to the model's cost.
    wall = time.perf_counter() - t0 + (previous["wall_seconds"] if previous else
                                       sum(h["seconds"] for h in history[:done]))
    unet_stages = (previous.get("unet_stages") or [
        dict(steps=previous["unet_steps"], seconds=previous["unet_seconds"],
             lr=None, last_loss=previous["unet_last_loss"], command=previous["command"])]
        if previous else [])
    unet_stages.append(dict(steps=int(cfg.unet.steps), seconds=round(unet_seconds, 1),
                            lr=float(cfg.unet.lr), last_loss=round(final_loss, 4),
                            command=command))
    record = dict(command=command, vae_loaded_from=cfg.vae.get("load"),
                  continued_from=previous, unet_stages=unet_stages, seed=int(cfg.seed),
                  resolution=int(cfg.resolution),
                  vae_steps=cycles, vae_cycles=history, vae_batch=int(cfg.vae.batch_size),
                  vae_crop=cfg.vae.crop, vae_seconds=round(vae_seconds, 1),
                  vae_heldout_psnr_db=round(vae_psnr, 2), scaling_factor=scaling,
                  decoder_steps=int(cfg.vae.decoder_steps),
                  decoder_seconds=round(decoder_seconds, 1),
                  decoder_heldout_psnr_db=round(decoder_psnr, 2),
                  scenes_encoded=int(latents.shape[0]), encode_seconds=round(encode_seconds, 1),
                  unet_steps=sum(st["steps"] for st in unet_stages),
                  unet_batch=int(cfg.unet.batch_size),
                  unet_seconds=round(sum(st["seconds"] for st in unet_stages), 1),
                  unet_last_loss=round(final_loss, 4),
                  wall_seconds=round(wall, 1), device=str(device),
                  machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
                  torch=torch.__version__, fp16_files=bool(cfg.save_fp16),
                  params=dict(unet=sum(p.numel() for p in unet.parameters()),
                              vae=sum(p.numel() for p in vae.parameters()),
                              text_encoder=sum(p.numel() for p in text_encoder.parameters())))
    (out / "training.json").write_text(json.dumps(record, indent=1))
    (out / "README.md").write_text(model_card(record))
    print(f"wrote {out} ({wall:.0f} s in all)", flush=True)
    return out


def _stage_text(st: dict) -> str:
    lr = "" if st["lr"] is None else f" at lr {st['lr']:g}"
    return f"{st['steps']} steps{lr} in {st['seconds']:.0f} s (`{st['command']}`)"


def model_card(r: dict) -> str:
    """The model card written beside the weights."""
    p = r["params"]
    loaded = ("" if not r.get("vae_loaded_from") else
              " (its first VAE cycles saved by an earlier run of the same script with the same settings, "
              "then loaded; the same seeds make the command without `vae.load` give the same "
              "weights in one go)")
    stages = r.get("unet_stages") or []
    stages = "" if len(stages) < 2 else (
        "; in stages, each a fresh warm-up + cosine schedule on newly drawn scenes: "
        + "; ".join(_stage_text(st) for st in stages))
    return f"""# toy: an SD-1.5-shaped model trained on dragexp's procedural world

`model=toy`. VAE (8x down, 4 latent channels, {p['vae'] / 1e6:.2f} M parameters), UNet (SD 1.5
topology: 4 levels, 16 transformer blocks, widths 32-64-64-64, {p['unet'] / 1e6:.2f} M), CLIP text
encoder (2 layers, width 64, {p['text_encoder'] / 1e6:.2f} M) and a byte-level CLIP BPE tokenizer
whose merges make each word of the world's captions one token. A diffusers
`StableDiffusionPipeline` folder: it loads with `dragexp.models.load_local` and with
`StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)`.

Trained on random scenes of `dragexp.data.toyworld` (1-3 discs, boxes, stars and rings, solid or
striped, on gradient / striped / checker backgrounds) at {r['resolution']} px. Nothing else:
it knows no other images, and its captions are the world's (`caption()`).

| | |
|---|---|
| command | `{r['command']}`{loaded} |
| seed | {r['seed']} |
| VAE | cycles of {r['vae_steps']} steps (each a warm-up + cosine schedule, fresh optimiser; held-out PSNR after each: {', '.join(f"{c['heldout_psnr_db']:.2f}" for c in r['vae_cycles'])} dB), batch {r['vae_batch']}, {r['vae_crop']} px crops, {r['vae_seconds']:.0f} s; held-out reconstruction {r['vae_heldout_psnr_db']:.2f} dB PSNR (64 scenes) |
| decoder fine-tuning | {r['decoder_steps']} steps on the frozen encoder's latents, {r['decoder_seconds']:.0f} s; held-out reconstruction {r['decoder_heldout_psnr_db']:.2f} dB |
| latents | {r['scenes_encoded']} (scenes and their mirror images), scaling factor {r['scaling_factor']:.5f} |
| UNet + text encoder | {r['unet_steps']} steps, batch {r['unet_batch']}, {r['unet_seconds']:.0f} s, last loss {r['unet_last_loss']}{stages} |
| wall time | {r['wall_seconds'] / 60:.1f} min on {r['device']} ({r['machine']}), torch {r['torch']} |
| files | {'fp16 safetensors (loaded as float32)' if r['fp16_files'] else 'fp32 safetensors'} |

The same command with the same seed on the same kind of machine gives the same weights; other
CPUs may differ in the last bits (kernel choice). All figures: `training.json`.
"""
