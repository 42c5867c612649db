"""Benchmark: images/s of our U-Net + diffusion against peer libraries. `python -m src.bench [quick=true]`.

Tasks (configs/bench.yaml `tasks`), each timed in images/s:
- ``train``: forward + backward + Adam step + EMA update (fused ``torch._foreach_lerp_``, as src/callbacks/ema.py)
  on random data. Ours: ``GaussianDiffusion.training_losses`` (L_simple). diffusers: ``UNet2DModel`` with the
  google/ddpm-cifar10-32 config, ``DDPMScheduler.add_noise`` and MSE on the noise (its train_unconditional
  example). denoising-diffusion-pytorch: ``Unet(dim=ch, dim_mults=ch_mult)`` with its own ``GaussianDiffusion``
  loss (objective pred_noise, linear betas). Same optimizer and EMA everywhere.
- ``sample_ddpm``: the full ancestral chain of ``sample_steps`` steps (ours: the ``Ancestral`` sampler of a
  T=sample_steps diffusion; diffusers: the ``DDPMScheduler`` step loop as ``DDPMPipeline`` runs it;
  denoising-diffusion-pytorch: ``p_sample_loop``).
- ``sample_ddim``: ``ddim_steps`` DDIM steps over T=num_timesteps (ours: the ``DDIM`` sampler; diffusers:
  ``DDIMScheduler`` loop with eta=0; denoising-diffusion-pytorch: ``ddim_sample``).
- ``sample_dpmpp``: ``dpmpp_steps`` DPM-Solver++(2M) steps over T=num_timesteps (ours: the ``DPMSolverPP2M``
  sampler; diffusers: the ``DPMSolverMultistepScheduler`` loop, dpmsolver++ order 2; denoising-diffusion-pytorch
  has none: its record says so). The peer ``diffusers_scheduler`` drives *our* U-Net with diffusers' DDIM and
  DPM-Solver++ scheduler loops (sampling tasks only), so its ratio is the sampling loop's own cost.

Settings: ``same_precision`` (both sides in ``precision``: fp32 on CPU, bf16 autocast on CUDA by default, and
the same plain Adam) and ``defaults`` (ours as it runs by default, bf16 autocast where the device runs it and
inference_mode for sampling, Adam with the training module's fused/foreach choice, plus the ``compile`` /
``channels_last`` levers when configs/bench.yaml turns them on; each peer as its own example / pipeline runs it:
fp32, no_grad / inference_mode, plain Adam).

Timing: within one (task, setting) the sides run in interleaved rounds (ours, peer 1, peer 2, ours, ...)
after ``warmup`` untimed rounds; images/s are computed from the median round time. On a shared machine
compare the ratios, not the absolute numbers.

Writes ``bench.json`` into the run folder: a list of records (``report.make_record``) with task, setting, peer,
ours, theirs (images/s), ratio (ours / theirs), device, precision ({ours, theirs}), batch_size, params,
flops_per_image (ours; train counts forward + backward as 3x forward), mfu (CUDA with a known peak, else null),
peak_mem_bytes (the side's own peak; on CUDA the allocator's peak during its rounds minus what was allocated
when the round began, plus the side's own weights, gradients, optimizer and EMA state then; on a CPU, for the
train task only, each side alone in a fresh process: its peak RSS during one round minus its RSS before, plus
its weights and EMA; ``cpu_memory=false`` skips it) and the raw round times.
A peer that is not installed gets a record with theirs/ratio null and a ``note``.

Modules: ``sides`` (ours and the peers, each as a ``Side`` of timed callables), ``timing`` (interleaved rounds,
peak memory), ``report`` (FLOPs, MFU, the records and the table), ``run`` (the settings and the whole run),
``__main__`` (the Hydra entry point).
"""

import os

# denoising-diffusion-pytorch's sampling loops draw a tqdm bar per chain; tqdm reads this when first imported
os.environ.setdefault("TQDM_DISABLE", "1")
