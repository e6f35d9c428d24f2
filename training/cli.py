"""`python -m training STAGE --out DIR`: train the reference cascade on the world, one stage per command.

    python -m training tokenizer --out runs/ref --minutes 120       world crops -> tokenizer.safetensors
    python -m training latents   --out runs/ref                     encode world clips -> latents.npy, stats
    python -m training base      --out runs/ref --minutes 120       (and sr1, sr2: independent of each other)
    python -m training cascade   --out runs/ref --to walt_export/weights/tiny.safetensors --inference-steps 25 --guidance 2
    python -m training probe     --out runs/ref                     which caption words the base follows

Each training command resumes from DIR/STAGE.state.safetensors, is seeded (--seed), stops at --steps or --minutes in all
(resumed runs included) and prints its wall time. The text encoder is not trained: it stays the seeded random
initialisation (TEXT_ENCODER_SEED), frozen as the paper freezes its pretrained T5 [P §5.1]; frozen, it lets the
three denoisers train independently (in parallel on one GPU) on text states that never change.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import walt_export
from runtime.video import to_frames
from runtime.world import scenes
from training import data, losses
from training.loop import Schedule, state_path, train, weights_path
from walt_export.cascade import build_component
from walt_export.config import PRESETS, CascadeConfig, TokenizerConfig

log = logging.getLogger("training")

TEXT_ENCODER_SEED = 0
STATS_FILE = "latent_stats.json"
DEFAULTS = {  # stage -> (batch, lr)
    "tokenizer": (16, 1e-3), "base": (16, 5e-4), "sr1": (8, 5e-4), "sr2": (8, 5e-4),
}  # the tokenizer's batch counts 64x64 crops: each step holds about batch x 64 x 64 pixels per frame


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("tokenizer", "base", "sr1", "sr2"):
        stage = sub.add_parser(name, help=f"train the {name}")
        stage.add_argument("--steps", type=int, help="stop after this many steps in all")
        stage.add_argument("--minutes", type=float, help="stop after this much wall time in all")
        stage.add_argument("--batch", type=int, default=DEFAULTS[name][0], help="samples per step")
        stage.add_argument("--lr", type=float, default=DEFAULTS[name][1], help="peak learning rate")
        stage.add_argument("--cooldown", type=float, default=0.0, metavar="MINUTES",
                           help="decay the learning rate linearly to 0 over the last MINUTES of --minutes "
                                "(default 0: none)")
        if name != "tokenizer":
            stage.add_argument("--timestep-logit-mean", type=float, default=None, metavar="M",
                               help="draw training timesteps logit-normal around M (t/T = sigmoid(M + N(0, 1)); "
                                    "M > 0: more noisy steps) instead of uniform (default)")
        if name == "tokenizer":
            stage.add_argument("--frames", type=int, default=5, help="frames per crop (1 + 4k; default 5)")
            stage.add_argument("--crops", type=int, nargs="+", default=[128, 256, 256, 256, 0],
                               help="square crop sizes, multiples of 8, each step one of them (repeat one to draw it "
                                    "more often); 0 = the whole frame (default 128 256 256 256 0)")
    latents = sub.add_parser("latents", help="encode world clips with the trained tokenizer (the denoisers' data)")
    latents.add_argument("--count", type=int, default=400, help="clips to encode (default 400)")
    psnr = sub.add_parser("psnr", help="the trained tokenizer's reconstruction PSNR on held-out world clips "
                                       "(PyTorch; `walt-export score` measures an exported one)")
    psnr.add_argument("--clips", type=int, default=2, help="held-out clips (default 2)")
    probe = sub.add_parser("probe", help="which caption words the trained base follows: its diffusion-classifier "
                                         "accuracy on colour, shape and direction (training/probe.py)")
    probe.add_argument("--weights", type=Path, help="base weights to probe (default: the run's base.safetensors)")
    probe.add_argument("--samples", type=int, default=32, help="training clips (default 32)")
    probe.add_argument("--timesteps", type=int, nargs="+", default=[500, 700, 900],
                       help="noise levels the loss is summed over (default 500 700 900)")
    cascade = sub.add_parser("cascade", help="assemble the stages' weights into one cascade checkpoint")
    cascade.add_argument("--to", required=True, help="the cascade checkpoint to write (.safetensors)")
    cascade.add_argument("--inference-steps", type=int, default=None,
                         help="the cascade's default DDIM steps (default: the preset's)")
    cascade.add_argument("--guidance", type=float, default=None,
                         help="the cascade's default classifier-free guidance scale (default: the preset's)")
    for command in sub.choices.values():
        command.add_argument("--out", required=True, type=Path, help="the run directory (resumed when it exists)")
        command.add_argument("--preset", choices=["tiny", "micro"], default="tiny", help="the cascade (default tiny)")
        command.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        command.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                             help="processes rendering world clips (0: the training process itself)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = PRESETS[args.preset]
    device = torch.device(args.device)
    started = time.perf_counter()
    if args.command == "latents":
        _encode(args, cfg, device)
    elif args.command == "psnr":
        _psnr(args, cfg, device)
    elif args.command == "cascade":
        _assemble(args, cfg)
    elif args.command == "probe":
        _probe(args, cfg, device)
    else:
        schedule = _schedule(args)
        if args.command == "tokenizer":
            _train_tokenizer(args, cfg, device, schedule)
        else:
            _train_denoiser(args, cfg, device, schedule)
    print(f"{args.command}: done in {(time.perf_counter() - started) / 60:.1f} min wall time")
    return 0


def _schedule(args) -> Schedule:
    if args.steps is None and args.minutes is None:
        raise SystemExit("pass --steps or --minutes (or both): how long to train")
    if args.cooldown < 0 or (args.cooldown > 0 and (args.minutes is None or args.cooldown > args.minutes)):
        raise SystemExit(f"--cooldown {args.cooldown:g} must be in [0, --minutes]: the decay ends with the time limit")
    return Schedule(steps=args.steps, minutes=args.minutes, lr=args.lr, cooldown_minutes=args.cooldown)


def _train_tokenizer(args, cfg: CascadeConfig, device: torch.device, schedule: Schedule) -> None:
    tokenizer = build_component(cfg, "tokenizer", seed=args.seed, device=device)
    sizes = [(cfg.height, cfg.width) if size == 0 else (size, size) for size in args.crops]
    crops = data.TokenizerCrops(args.seed, _resume_step(args.out, "tokenizer"), args.batch * 64 * 64, args.frames,
                                sizes, cfg.height, cfg.width)
    prefetch = {"prefetch_factor": 4} if args.workers else {}
    loader = torch.utils.data.DataLoader(crops, batch_size=None, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", **prefetch)
    train("tokenizer", tokenizer, losses.tokenizer_loss(iter(loader)), args.out, schedule)


def _resume_step(directory: Path, stage: str) -> int:
    """The step a resumed run of `stage` starts at (0 for a new run)."""
    from safetensors import safe_open

    path = state_path(directory, stage)
    if not path.is_file():
        return 0
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["step"])


def _encode(args, cfg: CascadeConfig, device: torch.device) -> None:
    tokenizer = walt_export.load(weights_path(args.out, "tokenizer"), device=device)
    latents, ids = data.build_latents(tokenizer.encoder, args.count, args.seed, cfg.frames, cfg.height, cfg.width,
                                      device, args.workers)
    mean = latents.mean(axis=(0, 2, 3, 4))
    std = latents.std(axis=(0, 2, 3, 4))
    shape = (1, -1, 1, 1, 1)
    data.save_latents(args.out, (latents - mean.reshape(shape)) / std.reshape(shape), ids)
    (args.out / STATS_FILE).write_text(json.dumps({"latent_mean": mean.tolist(), "latent_std": std.tolist()}))
    log.info("encoded %d clips; latent mean %s std %s", len(latents), np.round(mean, 3), np.round(std, 3))


@torch.no_grad()
def _psnr(args, cfg: CascadeConfig, device: torch.device) -> None:
    """Print the PSNR (dB, uint8 frames) of each held-out clip (`runtime.score.HELD_OUT_SEED`) at the cascade's
    size after the tokenizer's round trip (`runtime.score.tokenizer_psnrs`), and their mean: the number
    `walt-export score` reports."""
    from runtime.score import tokenizer_psnrs

    tokenizer = walt_export.load(weights_path(args.out, "tokenizer"), device=device)

    def reconstruct(video: np.ndarray) -> np.ndarray:
        return to_frames(tokenizer.decode(tokenizer.encode(torch.from_numpy(video).to(device))).cpu().numpy())

    values = tokenizer_psnrs(reconstruct, args.clips, cfg.frames, cfg.height, cfg.width)
    print(f"tokenizer PSNR on {args.clips} held-out clips: {', '.join(f'{v:.2f}' for v in values)} dB; "
          f"mean {np.mean(values):.2f} dB")


def _text_states(cfg: CascadeConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen text encoder's (states, mask) of every caption of the world and, last, the empty prompt."""
    encoder = build_component(cfg, "text_encoder", seed=TEXT_ENCODER_SEED, device=device)
    from runtime.text_tokenizer import load_text_tokenizer

    ids, mask = load_text_tokenizer(None, cfg.text_encoder.max_length)([s.caption for s in scenes()] + [""])
    ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
    with torch.no_grad():
        return encoder(ids, mask), mask


def _train_denoiser(args, cfg: CascadeConfig, device: torch.device, schedule: Schedule) -> None:
    name = args.command
    loss = _denoiser_loss(args, cfg, device, name, args.batch, args.timestep_logit_mean)
    model = build_component(cfg, name, seed=args.seed, device=device)
    train(name, model, loss, args.out, schedule)


def _denoiser_loss(args, cfg: CascadeConfig, device: torch.device, name: str, batch: int = 1,
                   timestep_logit_mean: float | None = None) -> losses.DenoiserLoss:
    """The training loss of the denoiser `name` on the run's latents (SystemExit when there are none)."""
    if not (args.out / "latents.npy").is_file():
        raise SystemExit(f"no latents in {args.out}: run `python -m training latents --out {args.out}` first (after "
                         "the tokenizer)")
    latents, ids = data.load_latents(args.out, device)
    states, mask = _text_states(cfg, device)
    return losses.DenoiserLoss(getattr(cfg, name), latents, ids, states, mask, cfg.diffusion, batch, args.seed,
                               timestep_logit_mean)


def _probe(args, cfg: CascadeConfig, device: torch.device) -> None:
    """Print the base's diffusion-classifier accuracy per attribute, text-to-video and with the first latent frame
    given (`training.probe`)."""
    from training.probe import caption_accuracy

    steps = cfg.diffusion.num_train_timesteps
    if args.samples < 1 or not all(0 <= t < steps for t in args.timesteps):
        raise SystemExit(f"--samples must be at least 1 and --timesteps in [0, {steps}): got --samples {args.samples} "
                         f"--timesteps {' '.join(map(str, args.timesteps))}")
    weights = args.weights or weights_path(args.out, "base")
    if not weights.is_file():
        raise SystemExit(f"no base weights at {weights}: train the base first (`python -m training base`) or pass "
                         "--weights")
    loss = _denoiser_loss(args, cfg, device, "base")
    model = walt_export.load(weights, device=device).eval()
    print(f"caption accuracy of {weights} on {args.samples} training clips, "
          f"t = {' '.join(map(str, args.timesteps))} (chance: colour 25%, shape 33%, direction 25%)")
    for frames, mode in ((0, "text-to-video"), (1, "first frame given")):
        accuracy = caption_accuracy(model, loss, args.samples, tuple(args.timesteps), frames, args.seed)
        print(f"{mode:18} " + "  ".join(f"{k} {v:6.1%}" for k, v in accuracy.items()))


def _assemble(args, cfg: CascadeConfig) -> None:
    stats = json.loads((args.out / STATS_FILE).read_text())
    tokenizer = TokenizerConfig(**cfg.tokenizer.model_dump() | stats)
    diffusion = cfg.diffusion.model_dump()
    if args.inference_steps:
        diffusion["num_inference_steps"] = args.inference_steps
    if args.guidance is not None:
        diffusion["guidance_scale"] = args.guidance
    config = CascadeConfig(**cfg.model_dump() | {"tokenizer": tokenizer.model_dump(), "diffusion": diffusion,
                                                 "trained_on": "world"})
    cascade = walt_export.Cascade(config, {
        "tokenizer": _with_config(walt_export.load(weights_path(args.out, "tokenizer")), tokenizer),
        "text_encoder": build_component(cfg, "text_encoder", seed=TEXT_ENCODER_SEED),
        **{name: walt_export.load(weights_path(args.out, name)) for name in cfg.denoisers()},
    })
    walt_export.save(cascade.eval(), args.to)
    print(f"wrote {args.to} ({Path(args.to).stat().st_size / 2**20:.1f} MiB)")


def _with_config(tokenizer, config: TokenizerConfig):
    """The trained tokenizer under the config that holds its latent statistics (they are config, not weights)."""
    tokenizer.config = tokenizer.encoder.config = tokenizer.decoder.config = config
    return tokenizer


if __name__ == "__main__":
    sys.exit(main())
