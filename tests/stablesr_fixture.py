"""Helpers for the StableSR parity fixture: its folder, its models built from its own configs, its cases.

The folder comes from $DIFFSR_FIXTURE_STABLESR (default ../shared/fixtures/stablesr). The diffusers
architectures are derived from the fixture's LDM yaml configs (not hard-coded), so another fixture
folder of the same layout, with other widths or cases, works too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffsr.diffusion.bases import BASES, BaseSpec, TextEncoderSpec
from diffsr.pipelines.stablesr import StableSRModels, build_models, read_stablesr_checkpoint

OLD_SCRIPT = "sr_val_ddpm_text_T_vqganfin_old.py"
TILE_SCRIPT = "sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py"
ROLE_NAMES = {"encoder_posterior_eps": "vae_posterior"}
"""Official draw roles (manifest) -> the pipeline's NoiseSource roles, where they differ."""


def fixture_root() -> Path:
    """The fixture folder, or skip with the reason when it is absent."""
    from conftest import fixture_folder

    root = fixture_folder("stablesr")
    if not (root / "manifest.json").is_file():
        pytest.skip(f"StableSR fixture folder {root} (manifest.json) is absent: set DIFFSR_FIXTURE_STABLESR or provide ../shared")
    return root


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _model_config(root: Path) -> dict[str, Any]:
    for path in sorted((root / "configs").glob("*.yaml")):
        config = _yaml(path)
        if "structcond_stage_config" in config.get("model", {}).get("params", {}):
            return config["model"]["params"]
    raise FileNotFoundError(f"{root}/configs: no LatentDiffusionSRTextWT yaml (with structcond_stage_config)")


def base_spec(root: Path) -> tuple[BaseSpec, str]:
    """A BaseSpec with the fixture's diffusers UNet / VAE / text configs, and its prediction type."""
    params = _model_config(root)
    unet = params["unet_config"]["params"]
    mc, mult = unet["model_channels"], list(unet["channel_mult"])
    widths = [mc * m for m in mult]
    attention = [2**level in unet["attention_resolutions"] for level in range(len(mult))]
    heads = [w // unet["num_head_channels"] if unet.get("num_head_channels", -1) > 0 else unet["num_heads"] for w in widths]
    sd = BASES["sd21-base"]
    unet_config = dict(sd.unet, block_out_channels=widths, layers_per_block=unet["num_res_blocks"], attention_head_dim=heads,
                       cross_attention_dim=unet["context_dim"], use_linear_projection=bool(unet.get("use_linear_in_transformer")),
                       transformer_layers_per_block=unet.get("transformer_depth", 1),
                       down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
                       up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)])
    dd = params["first_stage_config"]["params"]["ddconfig"]
    vae_config = dict(sd.vae, block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
                      latent_channels=dd["z_channels"], down_block_types=["DownEncoderBlock2D"] * len(dd["ch_mult"]),
                      up_block_types=["UpDecoderBlock2D"] * len(dd["ch_mult"]))
    cond = params["cond_stage_config"]["params"]
    text_cfg = json.loads((root / "configs" / f"{cond['arch']}.json").read_text())["text_cfg"]
    layers = text_cfg["layers"] - (1 if cond.get("layer", "penultimate") == "penultimate" else 0)
    text = dict(sd.text_encoders[0].config, hidden_size=text_cfg["width"], intermediate_size=4 * text_cfg["width"],
                num_attention_heads=text_cfg["heads"], num_hidden_layers=layers, vocab_size=text_cfg["vocab_size"],
                max_position_embeddings=text_cfg["context_length"])
    spec = BaseSpec("stablesr-fixture", "StableSR parity fixture", unet_config, vae_config,
                    (TextEncoderSpec("CLIPTextModel", text, "!", "cond_stage_model.model.", "openclip"),), sd.scheduler,
                    ("stablesr_tiny.ckpt",), str(root), "")
    prediction = "v_prediction" if params.get("parameterization", "eps") == "v" else "epsilon"
    return spec, prediction


def _checkpoint(root: Path, option: str, case: dict[str, Any]) -> Path:
    """A case's --ckpt / --vqgan_ckpt, taken by file name from the fixture's weights/ folder."""
    return root / "weights" / Path(case["opt"][option]).name


def load_models(root: Path, case: dict[str, Any]) -> StableSRModels:
    spec, prediction = base_spec(root)
    weights, cfw = _checkpoint(root, "ckpt", case), _checkpoint(root, "vqgan_ckpt", case)
    return build_models(read_stablesr_checkpoint(weights), spec, prediction, int(case["opt"]["input_size"]),
                        read_stablesr_checkpoint(cfw), names=(str(weights), str(cfw), ""))


@dataclass
class Case:
    name: str
    data: dict[str, Any]
    root: Path
    noise_files: list[str] = field(default_factory=list)

    @property
    def script(self) -> str:
        return Path(self.data["script"]).name

    @property
    def opt(self) -> dict[str, Any]:
        return self.data["opt"]

    def noise(self) -> list[torch.Tensor]:
        return [torch.from_numpy(np.load(self.root / d["file"])) for d in self.data["rng_draws_in_order"]]

    def roles(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(ROLE_NAMES.get(d["role"], d["role"]), tuple(d["shape"])) for d in self.data["rng_draws_in_order"]]

    def inputs(self) -> list[tuple[str, np.ndarray]]:
        """(output stem, float32 RGB in [0, 1]) in the script's processing order."""
        from PIL import Image

        out = []
        for name in self.data["processing_order"]:
            rgb = np.asarray(Image.open(self.root / "inputs" / name).convert("RGB")).astype(np.float32) / 255.0
            out.append((Path(name).stem, rgb))
        return out

    def expected(self, stem: str) -> np.ndarray:
        return np.load(self.root / self.data["outputs"][stem]["npy"])

    def run_options(self) -> dict[str, Any]:
        """The pipeline's run options for this case's script arguments."""
        opt = self.opt
        fix = {"nofix": "none"}.get(opt["colorfix_type"], opt["colorfix_type"])
        values = {"steps": int(opt["ddpm_steps"]), "dec_w": float(opt["dec_w"]), "color_fix": fix,
                  "input_size": int(opt["input_size"])}
        if self.script == TILE_SCRIPT:
            values.update(mode="tile", upscale=float(opt["upscale"]), latent_tile=int(opt["input_size"]) // 8,
                          latent_overlap=int(opt["tile_overlap"]), tile_batch=int(opt["n_samples"]),
                          pixel_tile=int(opt["vqgantile_size"]), pixel_stride=int(opt["vqgantile_stride"]))
        elif self.script == OLD_SCRIPT:
            values.update(mode="center-crop")
        else:
            raise ValueError(f"case {self.name}: script {self.script} is not ported")
        return values

    def sampling_key(self) -> tuple:
        """Cases with equal keys differ only in post-processing (colour fix, CFW weight) and can share sampling."""
        opt = {k: v for k, v in self.opt.items() if k not in ("colorfix_type", "dec_w", "outdir", "init_img")}
        return (self.script, json.dumps(opt, sort_keys=True), tuple(self.data["processing_order"]),
                tuple(d["file"] for d in self.data["rng_draws_in_order"]))


def cases(root: Path) -> list[Case]:
    manifest = json.loads((root / "manifest.json").read_text())
    return [Case(name, data, root) for name, data in manifest["cases"].items()]


# ------------------------------------------------------------------------------------------------
# tiny random StableSR checkpoints in the official layouts (no fixture needed)


@dataclass(frozen=True)
class TinyStableSR:
    base_dir: Path
    """Diffusers folder of the tiny SD 2 base (its configs also serve the single files)."""
    ckpt: Path
    """Full official-layout Lightning checkpoint: SD parts + encoder + SFT, with a pickled callback."""
    webui: Path
    """Only the encoder and SFT weights (what sd-webui-stablesr's extract_srmodule.py writes)."""
    cfw: Path
    """CFW autoencoder checkpoint (SD VAE trunk + decoder.fusion_layer_* + a loss tensor)."""


def _lightning_callback():
    """An instance of a class living in a 'pytorch_lightning' module, so the pickle references it as Lightning's do."""
    import sys
    import types

    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.best_model_score = torch.tensor(0.5)
            self.dirpath = "logs/checkpoints"

    ModelCheckpoint.__module__ = name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    return ModelCheckpoint, module, sys.modules


def write_tiny_stablesr(directory: Path, seed: int = 0) -> TinyStableSR:
    """A tiny SD 2.1-base-like model (VAE widened to 32 so CFW's GroupNorm(32) fits) with random StableSR parts."""
    from safetensors.torch import load_file

    from diffsr.diffusion.ldm_layout import vae_to_ldm
    from diffsr.diffusion.tiny import build_tiny_sd2, tiny_vae
    from diffsr.models.stablesr import CFW, EncoderLayout, StableSRAdapter, unet_resnet_names

    directory.mkdir(parents=True, exist_ok=True)
    base = build_tiny_sd2(directory / "base", "sd21-base", seed=seed)
    vae = tiny_vae(seed + 5, block_out_channels=[32, 32, 32, 32], norm_num_groups=32)
    vae.save_pretrained(str(base.diffusers_dir / "vae"))
    state = {k: v for k, v in load_file(str(base.single_file)).items() if not k.startswith("first_stage_model.")}
    trunk = vae_to_ldm(vae.state_dict(), 4)
    state.update({"first_stage_model." + k: v for k, v in trunk.items()})
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base.diffusers_dir, subfolder="unet")
    torch.manual_seed(seed + 7)
    adapter = StableSRAdapter(EncoderLayout.official(32, (2, 2), 1, (1,), 32),
                              {name: r.conv2.out_channels for name, r in unet_resnet_names(unet).items()})
    with torch.no_grad():  # modest modulation, so 2-level random features stay in range
        for layer in adapter.sft.values():
            layer.mlp_gamma.weight.mul_(0.2)
            layer.mlp_beta.weight.mul_(0.2)
    own = adapter.official_state_dict()
    state.update(own)
    state["betas"] = torch.linspace(0.00085, 0.012, 1000)  # Lightning files carry the schedule buffers too
    cls, module, modules = _lightning_callback()
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        modules.setdefault(name, __import__("types").ModuleType(name))
    modules[module.__name__] = module
    try:
        ckpt = directory / "stablesr_tiny.ckpt"
        torch.save({"state_dict": state, "global_step": 3, "callbacks": {cls: {"best": 1.0}}, "checkpoint": cls()}, ckpt)
    finally:
        for name in (module.__name__, "pytorch_lightning.callbacks", "pytorch_lightning"):
            modules.pop(name, None)
    webui = directory / "stablesr_webui_tiny.ckpt"
    torch.save({k: v.clone() for k, v in own.items()}, webui)
    torch.manual_seed(seed + 9)
    cfw = CFW({1: 32, 2: 32}, blocks=1)
    cfw_state = {k: v for k, v in trunk.items()}
    cfw_state.update(cfw.official_state_dict())
    cfw_state["loss.logvar"] = torch.zeros(())
    cfw_path = directory / "vqgan_cfw_tiny.ckpt"
    torch.save({"state_dict": cfw_state, "global_step": 11}, cfw_path)
    return TinyStableSR(base.diffusers_dir, ckpt, webui, cfw_path)
