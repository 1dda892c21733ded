"""``LiquidDiffusionPipeline``: image generation with a LiquidDiffusion U-Net, as a diffusers pipeline: unconditional,
or class-conditional with classifier-free guidance (``pipe(class_labels="dog", guidance_scale=2.0)``).

Components:

* ``unet`` -- a ``LiquidDiffusionUNet`` (velocity ``v = noise - x0`` at ``x_t = (1 - t) x0 + t noise``, t in [0, 1]).
* ``scheduler`` -- diffusers' ``FlowMatchEulerDiscreteScheduler`` (its sigma is our t).
* ``vae`` -- a frozen ``AutoencoderKL`` for latent-space models; absent (``None``) for pixel-space models.

Sampling integrates dx/dt = v from t = 1 to t = 0 on the package's grid t_i = 1 - i / N, so the pipeline's Euler
sampler gives exactly the images of ``liquid_diffusion.flow.euler_sample`` from the same noise (and
``sampler="heun"`` those of ``flow.heun_sample``). Any other diffusers flow-matching scheduler (for example
``FlowMatchHeunDiscreteScheduler``) can be swapped in; it then runs its own timestep loop.

Example::

    from liquid_diffusion import LiquidDiffusionPipeline
    pipe = LiquidDiffusionPipeline.from_pretrained("USER/NAME")   # or a local folder
    images = pipe(batch_size=4, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images
    images = pipe(class_labels=["cat", "dog"], guidance_scale=2.0).images   # class-conditional models

Because ``unet`` is this package's own class, ``model_index.json`` records it as ``["liquid_diffusion.model",
"LiquidDiffusionUNet"]``: diffusers imports that module of the installed package when loading, and finds the load
method through the ``ModelMixin`` the module imports. Saved pipelines therefore rely on ``liquid_diffusion.model``
keeping that class name.
"""

from __future__ import annotations

import logging
import os

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

from .flow import DEFAULT_GUIDANCE_SCALE, MODEL_CALLS_PER_STEP, check_sampler, guided_velocity
from .flow import sample as flow_sample
from .latents import unscale_latents, vae_downsample_factor
from .model import LiquidDiffusionUNet
from .sources import local_path

logger = logging.getLogger(__name__)

WEIGHTS_AND_CONFIGS = ("*.safetensors", "*.json")  # what from_pretrained fetches from a Hub repo: no pickles
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_STEPS = 25  # num_inference_steps of a model that records no recommended_steps


class LiquidDiffusionPipeline(DiffusionPipeline):
    """Rectified-flow sampling with an attention-free LiquidDiffusion U-Net, unconditional or class-conditional.

    Args:
        unet: the velocity network.
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (default config: ``shift=1``, ``num_train_timesteps=1000``).
        vae: ``AutoencoderKL`` that decodes latents (latent-space models); ``None`` for pixel-space models.
        resolution: default image height and width in pixels (the training resolution). ``None`` falls back to
            64 pixels for pixel-space models and 256 for latent-space ones.
        guidance_scale: the recommended classifier-free guidance scale of a class-conditional model (the one its
            training grids used), the default of ``__call__``; ``None`` falls back to ``DEFAULT_GUIDANCE_SCALE``.
        recommended_steps: the number of steps the model was made for (a few-step model made by reflow: 1-4), the
            default ``num_inference_steps`` of ``__call__``; ``None`` (an ordinary model): ``DEFAULT_STEPS``.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: LiquidDiffusionUNet,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        resolution: int | None = None,
        guidance_scale: float | None = None,
        recommended_steps: int | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(
            resolution=resolution, guidance_scale=guidance_scale, recommended_steps=recommended_steps
        )
        self._velocity_fn = self._model_velocity

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> LiquidDiffusionPipeline:
        """Loads a saved pipeline from a local folder or a Hub repo id (``USER/NAME``).

        A Hub repo is first fetched with ``huggingface_hub.snapshot_download`` (``*.safetensors`` and ``*.json``
        only; ``revision``, ``token``, ``cache_dir``, ``force_download``, ``local_files_only`` apply), then loaded
        from the local snapshot: diffusers' own Hub download refuses components of a library other than
        diffusers/transformers unless the repo ships their code, while ours come from the installed package.
        Other keyword arguments (``torch_dtype``, ...) go to ``DiffusionPipeline.from_pretrained``; weights are read
        from safetensors only (``use_safetensors=True`` unless overridden).
        """
        name = os.fspath(pretrained_model_name_or_path)
        download = {
            k: kwargs.pop(k) for k in ("revision", "force_download", "local_files_only", "proxies") if k in kwargs
        }
        path = local_path(name, f"pipeline folder {name!r} does not exist; check the path (or pass a Hub id)")
        if path is None:
            download.pop("proxies", None)
            path = snapshot_download(
                name,
                repo_type="model",
                token=kwargs.get("token"),
                cache_dir=kwargs.get("cache_dir"),
                allow_patterns=list(WEIGHTS_AND_CONFIGS),
                **download,
            )
        kwargs.setdefault("use_safetensors", True)  # weights are read from safetensors only, never from pickles
        return super().from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE stages - 1) (8 for SD-VAE), 1 without a VAE."""
        if getattr(self, "vae", None) is None:
            return 1
        return vae_downsample_factor(self.vae)

    def _sample_shape(self, batch_size: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        default = self.config.resolution or (256 if getattr(self, "vae", None) is not None else 64)
        height, width = height or default, width or default
        factor = self.vae_scale_factor * self.unet.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"height and width ({height}x{width}) must be divisible by {factor} (VAE factor "
                f"{self.vae_scale_factor} x U-Net downsampling {self.unet.downsample_factor})"
            )
        return (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )

    def _model_velocity(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None):
        return self.unet(x.to(self.unet.dtype), t, class_labels).sample

    def _velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v(x, t) with t a scalar tensor, expanded to [B] (float32, the model casts its embedding itself), guided
        when ``__call__`` was given class labels."""
        t = t.to(device=x.device, dtype=torch.float32).clamp(0.0, 1.0).expand(x.shape[0])
        return self._velocity_fn(x, t)

    def _class_ids(self, class_labels, batch_size: int, latents: torch.Tensor | None) -> torch.Tensor:
        """Names or ids -> int64 ids [B]: one label for the whole batch, or one per image (then B = their number)."""
        ids = self.unet.class_ids(class_labels)
        batch = len(latents) if latents is not None else (batch_size if len(ids) == 1 else len(ids))
        if len(ids) not in (1, batch):
            raise ValueError(f"got {len(ids)} class labels for {batch} images; give one label or one per image")
        return ids.expand(batch)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (as the model sees them, ``z * scaling_factor``) -> images in [-1, 1]; identity without a VAE.

        The VAE always runs in float32 or bfloat16: an SD-VAE in float16 overflows to NaN, so a float16 VAE is
        upcast to float32 once.
        """
        if getattr(self, "vae", None) is None:
            return latents
        if self.vae.dtype == torch.float16:
            logger.info("upcasting the VAE to float32 (SD-VAE decoding in float16 overflows)")
            self.vae.to(torch.float32)
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(unscale_latents(self.vae, latents)).sample

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 4,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        sampler: str = "euler",
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: int | str | list | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generates ``batch_size`` images (one per label when ``class_labels`` is a list).

        Args:
            batch_size: number of images (ignored when ``latents`` is given).
            num_inference_steps: N, the number of integration steps (Heun makes two model calls per step).
                Default: the model's ``config.recommended_steps`` (few-step models), else ``DEFAULT_STEPS`` (25).
            generator: torch generator(s) for the initial noise, for reproducible samples.
            latents: the initial noise x_1 itself, shape [B, C, h, w] (latent-space models: h = height / 8).
            sampler: ``"euler"`` or ``"heun"``, integrated on the grid t_i = 1 - i / N. Applies to
                ``FlowMatchEulerDiscreteScheduler``; any other scheduler runs its own loop (pass the default).
            height, width: image size in pixels (default: the training resolution in the config).
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (float array [B, H, W, 3] in [0, 1]),
                ``"pt"`` (float tensor [B, 3, H, W] in [0, 1]) or ``"latent"`` (the raw sample at t = 0, before
                VAE decoding and clamping).
            return_dict: return an ``ImagePipelineOutput`` (else a 1-tuple).
            class_labels: class-conditional models: a class name or id for every image, or a list with one per image
                (names from ``unet.config.class_names``). ``None`` samples unconditionally (the null class).
            guidance_scale: classifier-free guidance w, ``v = v_uncond + w (v_cond - v_uncond)`` on all channels
                (``flow.guided_velocity``, one batched model call); 1 = no guidance. Default: the model's
                recommended scale (``config.guidance_scale``), else ``DEFAULT_GUIDANCE_SCALE``.
        """
        check_sampler(sampler)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
        if num_inference_steps is None:
            num_inference_steps = self.config.get("recommended_steps") or DEFAULT_STEPS
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        device = self._execution_device
        self._velocity_fn = self._model_velocity
        if class_labels is not None:
            ids = self._class_ids(class_labels, batch_size, latents)
            batch_size = len(ids)
            self._velocity_fn = self._guided_velocity(ids.to(device), guidance_scale)

        if latents is None:
            shape = self._sample_shape(batch_size, height, width)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        x = latents.to(device=device, dtype=torch.float32)

        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            x = self._integrate_on_grid(x, num_inference_steps, sampler)
        else:
            if sampler != "euler":
                raise ValueError(
                    f"sampler={sampler!r} applies to FlowMatchEulerDiscreteScheduler; "
                    f"{type(self.scheduler).__name__} runs its own loop (leave sampler at its default)"
                )
            x = self._scheduler_loop(x, num_inference_steps, device)

        images = self._postprocess(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _guided_velocity(self, ids: torch.Tensor, guidance_scale: float | None):
        """The classifier-free-guided velocity function for class ids [B]; the scale defaults to the model's
        recommended one (``config.guidance_scale``), else ``DEFAULT_GUIDANCE_SCALE``."""
        scale = guidance_scale if guidance_scale is not None else self.config.guidance_scale
        scale = DEFAULT_GUIDANCE_SCALE if scale is None else scale
        return guided_velocity(self._model_velocity, ids, scale, self.unet.null_class)

    def _postprocess(self, x: torch.Tensor, output_type: str):
        """The sample at t = 0 as ``output_type``: decoded, mapped from [-1, 1] to [0, 1] and clamped (``latent``:
        as it is)."""
        if output_type == "latent":
            return x
        images = (self.decode_latents(x).float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images

    def _integrate_on_grid(self, x: torch.Tensor, num_steps: int, sampler: str) -> torch.Tensor:
        """The package's own Euler or Heun sampler (``flow.sample``) on t_i = 1 - i / N: the very code that draws
        the training grids and the ``sample`` command's images; ``FlowMatchEulerDiscreteScheduler.step`` is the same
        Euler step, and its config is kept for diffusers' tools."""
        bar = self.progress_bar(total=num_steps * MODEL_CALLS_PER_STEP[sampler])

        def velocity(x, t):
            bar.update(1)
            return self._velocity_fn(x, t.to(torch.float32))

        with bar:
            return flow_sample(velocity, x, num_steps, sampler).float()

    def _scheduler_loop(self, x: torch.Tensor, num_steps: int, device: torch.device) -> torch.Tensor:
        """The generic diffusers loop for another flow-matching scheduler (its timesteps are sigma * 1000)."""
        self.scheduler.set_timesteps(num_steps, device=device)
        scale = float(self.scheduler.config.num_train_timesteps)
        for timestep in self.progress_bar(self.scheduler.timesteps):
            v = self._velocity(x, timestep / scale)
            x = self.scheduler.step(v.float(), timestep, x).prev_sample.float()
        return x
