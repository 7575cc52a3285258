"""The PyTorch side of `python -m mae_jax.bench --compare=torch`: the same train step in the reference's framework.

  python -m mae_jax.bench_torch '<JSON spec>'   # run by the bench in a subprocess; prints one JSON line

The bench times its JAX step first, then runs this in a process of its own (so the two thread pools do not
compete), at the same global batch, with torch threads = the bench process's cores. What one step contains:

  mae      HF transformers' `ViTMAEForPreTraining` (facebookresearch/mae's architecture: pre-norm ViT encoder on
           the visible patches, lightweight decoder, MSE on the masked patches) with our config's sizes,
           forward with its loss, backward, `torch.optim.AdamW` step.
  gan_mae  GAN-MAE's alternating step as mae_jax/objectives/gan_mae.py computes it. Generator phase: the MAE
           forward; the discriminator (the same encoder over every patch of the corrupted image, then a
           Linear(D -> 1) per patch token) forward and backward to the generated pixels only; VQGAN's adaptive
           weight at decoder_pred from those gradients; backward of L_rec + lambda L_adv through the MAE;
           an AdamW step on encoder + decoder. Discriminator phase: the MAE forward again (no gradient), the
           discriminator forward and backward, an AdamW step on encoder + head.

Eager PyTorch (no torch.compile), HF's default attention (SDPA), one AdamW parameter group (the reference's
groups without weight decay on biases and norms cost the same), synthetic images. Timed as the bench times
JAX: `warmup` untimed steps, then the median of `steps` timed ones, each ending when its loss is on the host.
"""
import json
import os
import statistics
import subprocess
import sys
import time

OBJECTIVES = ('mae', 'gan_mae')
# The GAN-MAE settings the torch step models; mae_jax's other options (joint updates, ...) are not built here.
GAN_MAE_MODELLED = dict(update_scheme='alternating', adv_weight_mode='adaptive', disc_loss='mean',
                        adv_through_disc_encoder=False)
ADAPTIVE_EPS = 1e-4  # as mae_jax.objectives.gan_mae


def unavailable(config):
  """Why `--compare=torch` cannot run for `config` (one line), or None."""
  import importlib.util
  if config.objective not in OBJECTIVES or config.task != 'pretrain':
    return (f'--compare=torch is not available for objective {config.objective!r} with config.task='
            f'{config.task!r} yet (only for pretraining with {", ".join(OBJECTIVES)})')
  missing = [name for name in ('torch', 'transformers') if importlib.util.find_spec(name) is None]
  if missing:
    return f'--compare=torch needs {" and ".join(missing)} (pip install -e ".[test]")'
  if config.objective == 'gan_mae':
    changed = [f'config.gan_mae.{k}={config.gan_mae[k]!r}' for k, v in GAN_MAE_MODELLED.items()
               if config.gan_mae[k] != v]
    if changed:
      return f'--compare=torch models GAN-MAE\'s default step only, not {", ".join(changed)}'
  return None


def spec_from_config(config, steps, warmup, device):
  """What the torch process needs, as plain JSON: the model's sizes, the batch, the optimizer, the timing."""
  from mae_jax.models import vit
  dec = config.model.decoder
  return dict(
      objective=config.objective, **vit.parse_variant(config.model.variant), mlp_ratio=config.model.mlp_ratio,
      img_size=config.data.img_size, decoder=dict(width=dec.width, depth=dec.depth, num_heads=dec.num_heads),
      mask_ratio=config.mae.mask_ratio, norm_pix_loss=config.mae.norm_pix_loss,
      gan=dict(adv_weight=config.gan_mae.adv_weight, adv_weight_max=config.gan_mae.adv_weight_max,
               disc_weight=config.gan_mae.disc_weight),
      dtype=str(vit.compute_dtype(config.model)), remat=bool(config.model.remat), batch_size=config.train.batch_size,
      lr=config.train.blr * config.train.batch_size / 256, betas=(config.train.b1, config.train.b2),
      weight_decay=config.train.weight_decay, seed=config.seed, steps=steps, warmup=warmup,
      threads=len(os.sched_getaffinity(0)), device=device)


def compare(config, steps, warmup, device):
  """Runs the torch step in a subprocess; its figures (a dict), or raises RuntimeError with its last line."""
  spec = json.dumps(spec_from_config(config, steps, warmup, device))
  result = subprocess.run([sys.executable, '-m', 'mae_jax.bench_torch', spec], text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  lines = [line for line in result.stdout.splitlines() if line.startswith('{')]
  if result.returncode or not lines:
    reason = (result.stderr.strip().splitlines() or [f'exit code {result.returncode}'])[-1]
    raise RuntimeError(f'the PyTorch side failed: {reason}')
  return json.loads(lines[-1])


# --- in the torch process ------------------------------------------------------------------------------


def build_mae(spec):
  from transformers import ViTMAEConfig, ViTMAEForPreTraining
  dec = spec['decoder']
  config = ViTMAEConfig(
      hidden_size=spec['width'], num_hidden_layers=spec['depth'], num_attention_heads=spec['num_heads'],
      intermediate_size=int(spec['width'] * spec['mlp_ratio']), image_size=spec['img_size'],
      patch_size=spec['patch_size'], num_channels=3, qkv_bias=True, decoder_hidden_size=dec['width'],
      decoder_num_hidden_layers=dec['depth'], decoder_num_attention_heads=dec['num_heads'],
      decoder_intermediate_size=int(dec['width'] * spec['mlp_ratio']), mask_ratio=spec['mask_ratio'],
      norm_pix_loss=spec['norm_pix_loss'], layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)
  model = ViTMAEForPreTraining(config)
  if spec['remat']:
    model.gradient_checkpointing_enable()
  return model


def trainable(module):
  return [p for p in module.parameters() if p.requires_grad]  # the fixed sin-cos tables are frozen params


def adamw(spec, params):
  import torch
  return torch.optim.AdamW(params, lr=spec['lr'], betas=tuple(spec['betas']), weight_decay=spec['weight_decay'])


def mae_step(spec, model, images):
  """MAE: forward with the loss, backward, AdamW. Returns (step function -> loss tensor, trainable params)."""
  optimizer = adamw(spec, trainable(model))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = model(pixel_values=images).loss
    loss.backward()
    optimizer.step()
    return loss

  return step, trainable(model)


def encode_every_patch(vit, images):
  """HF `ViTMAEModel`'s encoder over every patch: its forward always drops `config.mask_ratio` of them."""
  import torch
  emb = vit.embeddings
  pos = emb.position_embeddings
  x = emb.patch_embeddings(images) + pos[:, 1:]
  x = torch.cat([(emb.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
  for layer in vit.layers:
    x = layer(x, None)
  return vit.layernorm(x)


def gan_mae_step(spec, model, images):
  """GAN-MAE's alternating step (the module docstring). Returns (step function -> loss tensor, trainable params)."""
  import torch
  import torch.nn.functional as F
  head = torch.nn.Linear(spec['width'], 1)
  generator = adamw(spec, trainable(model))
  discriminator = adamw(spec, trainable(model.vit) + list(head.parameters()))
  gan = spec['gan']
  hidden = []  # decoder_pred's input, for the adaptive weight
  model.decoder.decoder_pred.register_forward_hook(lambda module, args, out: hidden.append(args[0]))
  num_patches = (spec['img_size'] // spec['patch_size']) ** 2

  def discriminate(target, pred, mask):
    """Per-patch logits (N, L) on the corrupted image: original visible patches, generated masked ones."""
    m = mask[..., None]
    corrupted = model.unpatchify(target * (1 - m) + pred * m)
    return head(encode_every_patch(model.vit, corrupted)[:, 1:])[..., 0]

  def kernel_grad_norm(h, grad_pred):
    return torch.linalg.norm(torch.einsum('nld,nlo->do', h, grad_pred))

  def step():
    noise = torch.rand(images.shape[0], num_patches)  # one mask for both phases, as mae_jax's example keys
    target = model.patchify(images)
    hidden.clear()
    out = model(pixel_values=images, noise=noise)
    rec, pred, mask = out.loss, out.logits, out.mask
    # Generator phase: the discriminator's gradient at the generated pixels only (a frozen discriminator).
    pred_at = pred.detach().requires_grad_()
    adv = (F.softplus(-discriminate(target, pred_at, mask)) * mask).sum() / mask.sum()
    (adv_grad,) = torch.autograd.grad(adv, pred_at)
    (rec_grad,) = torch.autograd.grad(rec, pred, retain_graph=True)
    h = hidden[-1][:, 1:].detach()  # the cls token's prediction is dropped
    ratio = kernel_grad_norm(h, rec_grad) / (kernel_grad_norm(h, adv_grad) + ADAPTIVE_EPS)
    weight = gan['adv_weight'] * ratio.clamp(0.0, gan['adv_weight_max'])
    generator.zero_grad(set_to_none=True)
    (rec + weight * (adv_grad * pred).sum()).backward()  # the adversarial gradient, pushed through the MAE
    generator.step()
    # Discriminator phase, with the updated params.
    with torch.no_grad():
      out = model(pixel_values=images, noise=noise)
    logits = discriminate(target, out.logits, out.mask)
    disc = gan['disc_weight'] * torch.where(out.mask > 0, F.softplus(logits), F.softplus(-logits)).mean()
    discriminator.zero_grad(set_to_none=True)
    disc.backward()
    discriminator.step()
    return rec.detach() + weight * adv.detach() + disc.detach()

  return step, trainable(model) + list(head.parameters())


def time_steps(step, steps, warmup):
  """(median seconds of the timed steps, every step's loss); a step ends when its loss is on the host."""
  times, losses = [], []
  for i in range(warmup + steps):
    start = time.perf_counter()
    losses.append(float(step()))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times), losses


def run(spec):
  import contextlib

  import torch
  torch.set_num_threads(spec['threads'])
  torch.manual_seed(spec['seed'])
  device = torch.device(spec['device'])
  torch.set_default_device(device)
  model = build_mae(spec)
  images = torch.randn(spec['batch_size'], 3, spec['img_size'], spec['img_size'])
  build = gan_mae_step if spec['objective'] == 'gan_mae' else mae_step
  step, params = build(spec, model, images)
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec['dtype'] == 'bfloat16'
              else contextlib.nullcontext())
  with autocast:
    step_s, losses = time_steps(step, spec['steps'], spec['warmup'])
  return dict(step_s=step_s, images_per_s=spec['batch_size'] / step_s, num_params=sum(p.numel() for p in params),
              first_loss=losses[0], loss=losses[-1], threads=torch.get_num_threads(), torch=torch.__version__)


if __name__ == '__main__':
  print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
