"""The SUPIR fixture folder (official test.py outputs on tiny random weights), read the same way by every SUPIR test.

The folder comes from DIFFSR_FIXTURE_SUPIR (default ../shared/fixtures/supir); the tiny architecture
is read from its own configs (the official YAML, the CLIP-L config, the OpenCLIP config), so another
folder of the same layout, with other sizes or cases, works too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import fixture_folder
from PIL import Image

from diffsr.diffusion.bases import BASES, BaseSpec, TextEncoderSpec


def fixture_root() -> Path:
    """The fixture folder, or skip with the reason when it is absent (as on a user's machine)."""
    root = fixture_folder("supir")
    if not (root / "cases.json").is_file():
        pytest.skip(f"{root} is absent (set DIFFSR_FIXTURE_SUPIR to a SUPIR fixture folder): it exists only beside the development checkout and in CI")
    return root


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def base_spec(root: Path, config: str = "supir_v0_tiny.yaml") -> BaseSpec:
    """The SDXL BaseSpec of the fixture's tiny model, from its official-format configs."""
    params = _yaml(root / "configs" / config)["model"]["params"]
    net = params["network_config"]["params"]
    widths = [net["model_channels"] * m for m in net["channel_mult"]]
    attention = [2**level in net["attention_resolutions"] for level in range(len(widths))]
    sdxl = BASES["sdxl-base"]
    embedders = params["conditioner_config"]["params"]["emb_models"]
    unet = dict(sdxl.unet, block_out_channels=widths, attention_head_dim=[max(1, w // net["num_head_channels"]) for w in widths],
                cross_attention_dim=net["context_dim"], transformer_layers_per_block=list(net["transformer_depth"]),
                addition_time_embed_dim=embedders[2]["params"]["outdim"], projection_class_embeddings_input_dim=net["adm_in_channels"],
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)])
    dd = params["first_stage_config"]["params"]["ddconfig"]
    vae = dict(sdxl.vae, block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
               down_block_types=["DownEncoderBlock2D"] * len(dd["ch_mult"]), up_block_types=["UpDecoderBlock2D"] * len(dd["ch_mult"]),
               latent_channels=dd["z_channels"], scaling_factor=params["scale_factor"])
    clip_l = json.loads((root / "configs" / "clip-l-tiny" / "config.json").read_text())
    open_clip = json.loads((root / "configs" / "supir-tiny-bigG.json").read_text())["text_cfg"]
    big_g = dict(sdxl.text_encoders[1].config, hidden_size=open_clip["width"], num_attention_heads=open_clip["heads"],
                 num_hidden_layers=open_clip["layers"], intermediate_size=int(open_clip["width"] * open_clip.get("mlp_ratio", 4.0)),
                 projection_dim=json.loads((root / "configs" / "supir-tiny-bigG.json").read_text())["embed_dim"],
                 vocab_size=open_clip["vocab_size"], max_position_embeddings=open_clip["context_length"], hidden_act="gelu")
    texts = (TextEncoderSpec("CLIPTextModel", clip_l, "<|endoftext|>", sdxl.text_encoders[0].ldm_prefix, "hf"),
             TextEncoderSpec("CLIPTextModelWithProjection", big_g, "!", sdxl.text_encoders[1].ldm_prefix, "openclip"))
    return BaseSpec("sdxl-tiny", "the SUPIR fixture's tiny SDXL", unet, vae, texts, sdxl.scheduler, ("sdxl_base_tiny.safetensors",),
                    str(root), "", "StableDiffusionXLPipeline")


def write_config_dir(spec: BaseSpec, folder: Path) -> Path:
    """A diffusers-style folder of component configs (what --config-dir takes on the command line)."""
    for name, config in (("unet", spec.unet), ("vae", spec.vae), ("text_encoder", spec.text_encoders[0].config),
                         ("text_encoder_2", spec.text_encoders[1].config)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec.scheduler))
    return folder


def _argv_value(argv: list[str], flag: str, default: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv else default


@dataclass
class Case:
    name: str
    data: dict[str, Any]
    root: Path

    @property
    def common(self) -> Path:
        return self.root / self.data["input"]["common_dir"]

    @property
    def expected(self) -> Path:
        return self.root / "expected" / self.name

    def array(self, name: str) -> np.ndarray:
        path = self.expected / name
        return np.load(path if path.exists() else self.common / name)

    def lq(self) -> torch.Tensor:
        """The preprocessed input the official code stored (its Pillow resize of the LR crop)."""
        pixels = np.asarray(Image.open(self.common / "lq_resized.png").convert("RGB")).astype(np.float64) / 255 * 2 - 1
        return torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]

    def draws(self) -> list[torch.Tensor]:
        return [torch.from_numpy(np.load(self.root / d["file"])) for d in self.data["rng_draws_in_order"]]

    @property
    def scale(self) -> int:
        return int(_argv_value(self.data["test_py_argv"], "--upscale", "1"))

    @property
    def min_size(self) -> int:
        return int(_argv_value(self.data["test_py_argv"], "--min_size", "1024"))

    def run_values(self) -> dict[str, Any]:
        """The case's batchify_sample arguments as diffsr supir run options."""
        kw = self.data["batchify_sample_kwargs"]
        values: dict[str, Any] = dict(
            steps=kw["num_steps"], s_churn=float(kw["s_churn"]), s_noise=kw["s_noise"], s_cfg=kw["cfg_scale"],
            spt_linear_cfg=kw["cfg_scale_start"] if kw["use_linear_CFG"] else kw["cfg_scale"], s_stage2=kw["control_scale"],
            linear_s_stage2=kw["use_linear_control_scale"], spt_linear_s_stage2=kw["control_scale_start"],
            s_stage1=float(kw["restoration_scale"]), color_fix=kw["color_fix_type"].lower(), caption=self.data["captions"][0],
            a_prompt=kw["p_p"], n_prompt=kw["n_p"], scale=self.scale, min_size=self.min_size, seed=kw["seed"])
        sampler = _yaml(self.root / "configs" / self.data["config"])["model"]["params"]["sampler_config"]
        tiled = sampler["target"].endswith("TiledRestoreEDMSampler")
        values["tiled_sampling"] = tiled
        if tiled:
            values.update(latent_tile=sampler["params"]["tile_size"],
                          latent_overlap=sampler["params"]["tile_size"] - sampler["params"]["tile_stride"])
        return values


def cases(root: Path) -> list[Case]:
    data = json.loads((root / "cases.json").read_text())["cases"]
    return [Case(name, case, root) for name, case in data.items()]


def case_names() -> list[str]:
    """Case names for parametrisation at collection time ([] when the folder is absent: the test then skips)."""
    root = fixture_folder("supir")
    if not (root / "cases.json").is_file():
        return ["absent"]
    return list(json.loads((root / "cases.json").read_text())["cases"])
