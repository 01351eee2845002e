"""OSEDiff speed and peak memory per 512 x 512 output, full-size SD 2.1-base architecture with random weights.

No download: the UNet, VAE and text encoder are built from the SD 2.1-base configs in diffsr.diffusion.bases
(random weights; speed and memory do not depend on the values), OSEDiff's LoRA is put on the official target
modules (rank 4), and a 128 x 128 LR is restored to 512 x 512 exactly as `diffsr upscale --method osediff`
does (text encoder, VAE encoder, one UNet step, decoder, AdaIN). Prints one row per configuration.

    PYTHONPATH=. python benchmarks/bench_osediff.py                      # CPU, fp32, LoRA unmerged and merged
    PYTHONPATH=. python benchmarks/bench_osediff.py --device cuda --dtype fp16 bf16 --compile
Official figures for comparison: 0.35 s per 512^2 image on an A100 (paper, Table 2) and 0.1046 s (README's
test_inference_time.py: fp16, LoRA merged, DAPE included).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_lora(model: torch.nn.Module, adapters: dict[str, list[str]], rank: int = 4) -> dict[str, torch.Tensor]:
    """Random LoRA A/B for the named modules, keyed as in osediff.pkl (A: rank x in [x k x k], B: out x rank [x 1 x 1])."""
    state = {}
    for adapter, names in adapters.items():
        for name in dict.fromkeys(names):
            layer = model.get_submodule(name)
            if isinstance(layer, torch.nn.Conv2d):
                a = torch.randn(rank, layer.in_channels, *layer.kernel_size) / rank
                b = torch.randn(layer.out_channels, rank, 1, 1) * 0.01
            else:
                a, b = torch.randn(rank, layer.in_features) / rank, torch.randn(layer.out_features, rank) * 0.01
            state[f"{name}.lora_A.{adapter}.weight"], state[f"{name}.lora_B.{adapter}.weight"] = a, b
    return state


def build(device: str, dtype: str, merge: bool, compile_unet: bool, attention: str):
    """A pipeline of the real SD 2.1-base sizes with random weights and random (non-zero) OSEDiff LoRA."""
    import diffusers
    import transformers

    from diffsr.diffusion.bases import BASES
    from diffsr.diffusion.loading import BaseComponents, clip_tokenizer
    from diffsr.diffusion.runtime import Runtime
    from diffsr.pipelines.osediff import OSEDiffPipeline, OSEDiffWeights, unet_lora_targets, vae_lora_targets

    spec = BASES["sd21-base"]
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(strip(spec.unet))
    vae = diffusers.AutoencoderKL.from_config(strip(spec.vae))
    text_config = {k: v for k, v in spec.text_encoders[0].config.items() if k not in ("architectures", "model_type", "transformers_version")}
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config))
    scheduler = diffusers.DDPMScheduler.from_config(strip(spec.scheduler))
    weights = OSEDiffWeights(random_lora(unet, unet_lora_targets(unet)), random_lora(vae, {"default_encoder": vae_lora_targets(vae)}),
                             "random")
    weights.unet.update({"conv_in.base_layer.weight": unet.conv_in.weight.detach().clone(),
                         "conv_in.base_layer.bias": unet.conv_in.bias.detach().clone()})
    components = BaseComponents(spec, source="random-sd21-base", unet=unet, vae=vae, text_encoders=[text],
                                tokenizers=[clip_tokenizer(spec.text_encoders[0].pad_token)], scheduler=scheduler)
    runtime = Runtime.from_options({"device": device, "dtype": dtype, "attention": attention, "compile": compile_unet})
    return OSEDiffPipeline(components, weights, runtime, merge=merge)


def run(pipeline, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Seconds per 512^2 image (median of `repeats` after `warmup` runs) and peak device memory in MB (on the CPU: the
    process's peak RSS, weights included)."""
    from diffsr.io.image import ImageData

    rng = np.random.default_rng(0)
    image = ImageData(np.round(rng.uniform(0, 1, (128, 128, 3)) * 255).astype(np.float32) / 255, None, 8)
    cuda = pipeline.runtime.device.type == "cuda"
    for _ in range(warmup):
        pipeline.upscale(image, seed=0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = pipeline.upscale(image, seed=0)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    assert out.pixels.shape == (512, 512, 3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    return float(np.median(times)), peak


def parity(folder: str) -> None:
    """Per case and input of an OSEDiff fixture folder: max / mean |ours - official| of the float output."""
    import json
    from pathlib import Path

    from PIL import Image

    from diffsr.io.image import read_image
    from diffsr.pipelines.osediff import COLOR_FIX_NAMES, fix_colours, load

    root = Path(folder)
    spec = json.loads((root / "cases.json").read_text())
    pipeline = load(str(root / spec.get("osediff_weights", "osediff_tiny.pkl")), str(root / spec.get("model_dir", "sd-tiny")),
                    device="cpu", dtype="fp32")
    print("| case | input | max abs diff | mean abs diff | colour fix in isolation (max) |")
    print("|---|---|---|---|---|")
    for case in spec["cases"]:
        args = case["args"]
        for entry in spec["inputs"]:
            stem, record = entry["stem"], {}
            pipeline.upscale(read_image(root / "inputs" / f"{stem}.png"), prompt=args["user_prompt"],
                             tags=case.get("caption_in_place_of_RAM", ""), upscale=args["upscale"], process_size=args["process_size"],
                             align_method=args["align_method"], resize_back=False, latent_tile=args["latent_tiled_size"],
                             latent_overlap=args["latent_tiled_overlap"], vae_encoder_tile=args["vae_encoder_tiled_size"],
                             vae_decoder_tile=args["vae_decoder_tiled_size"], vae_statistics="vaehook", seed=args["seed"],
                             record=record)
            expected = np.load(root / "expected" / case["name"] / f"{stem}.npy")
            fixed = COLOR_FIX_NAMES[args["align_method"]] != "none"
            ours = (record["fixed"] if fixed else record["restored"])[0].numpy()
            diff = np.abs(ours - expected)
            isolated = ""
            plain = root / "expected" / "a_notile" / f"{stem}.png"
            if fixed and plain.is_file():
                target = torch.from_numpy(np.asarray(Image.open(plain).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
                isolated = f"{np.abs(fix_colours(target, record['preprocessed'], args['align_method'])[0].numpy() - expected).max():.1e}"
            print(f"| {case['name']} | {stem} | {diff.max():.2e} | {diff.mean():.2e} | {isolated} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--merge", nargs="+", default=["no", "yes"], choices=["no", "yes"], help="rows with the LoRA unmerged / merged")
    parser.add_argument("--compile", action="store_true", help="also rows with torch.compile on the UNet")
    parser.add_argument("--attention", nargs="+", default=["sdpa"], choices=["sdpa", "eager"])
    parser.add_argument("--parity", metavar="FIXTURE", help="instead: per-case differences from an OSEDiff fixture folder")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.parity:
        parity(args.parity)
        return
    print("| device | dtype | attention | LoRA | compile | s / 512^2 image | peak MB | weights MB |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtype:
        for attention in args.attention:
            for merge in [m == "yes" for m in args.merge]:
                for compiled in ((False, True) if args.compile else (False,)):
                    pipeline = build(args.device, dtype, merge, compiled, attention)
                    seconds, peak = run(pipeline, args.repeats, args.warmup)
                    kind = "host RSS" if args.device == "cpu" else "device"
                    size = sum(p.numel() * p.element_size() for m in (pipeline.unet, pipeline.vae, pipeline.text_encoder)
                               for p in m.parameters()) / 2**20
                    print(f"| {args.device} | {dtype} | {attention} | {'merged' if merge else 'peft'} | {compiled} | {seconds:.3f} | "
                          f"{peak:.0f} ({kind}) | {size:.0f} |", flush=True)
                    del pipeline
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
    print("official: 0.35 s on an A100 (paper Table 2); 0.1046 s (README, fp16, merged LoRA, A100)")


if __name__ == "__main__":
    main()
