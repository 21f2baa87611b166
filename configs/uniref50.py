"""SEDD on protein sequences (UniRef50 layout; the bundled UniProt set by default).

Variants, selected as ``--config=configs/uniref50.py:NAME``:

* ``tiny``: the README's default; minutes on a laptop CPU on the bundled data.
* ``small``: SEDD-small shape (768 hidden, 12 blocks, 12 heads, cond 128), length 1024.
* ``medium``: SEDD-medium shape (1024 hidden, 24 blocks, 16 heads, cond 128), length 1024.
* ``protlig_stable``: the PyTorch fork's stable recipe (d768, cond 256, 8 blocks, 12 heads,
  length 512, cosine noise 1e-4..0.5, lr 5e-5, warmup 10k, clip 0.5, EMA 0.9995, linear
  curriculum over 20k steps).

Override any key on the command line: ``--config.optim.lr=1e-4``.
"""

import ml_collections

VARIANTS = ("tiny", "small", "medium", "protlig_stable")


def base_config() -> ml_collections.ConfigDict:
  """Every key the training job reads, with SEDD-small reference defaults."""
  c = ml_collections.ConfigDict()
  c.variant = "small"
  c.seed = 0  # 0 .. 2**32 - 1 (a 32-bit seed: grain shuffles with it)

  c.graph = ml_collections.ConfigDict()
  c.graph.type = "absorb"  # absorb | uniform
  c.graph.tokens = 32  # ESM-2 alphabet without <mask>; absorb adds <mask> = 32

  c.noise = ml_collections.ConfigDict()
  c.noise.type = "loglinear"  # loglinear | geometric | cosine
  c.noise.eps = 1e-3
  c.noise.sigma_min = 1e-4
  c.noise.sigma_max = 20.0

  c.curriculum = ml_collections.ConfigDict()
  c.curriculum.kind = "none"  # none | time_bias | sigma_scale
  c.curriculum.ramp = "linear"  # linear | exponential | cosine
  c.curriculum.preschool_time = 5000

  c.model = ml_collections.ConfigDict()
  c.model.hidden_size = 768
  c.model.n_heads = 12
  c.model.n_blocks = 12
  c.model.cond_dim = 128
  c.model.dropout = 0.1
  c.model.scale_by_sigma = True
  c.model.length = 1024  # maximum sequence length
  c.model.attention = "auto"  # auto | xla | cudnn | chunked
  c.model.attention_chunk = 0  # key/value chunk of `chunked`; 0 = chosen from the length
  c.model.dtype = "bfloat16"  # compute dtype: bfloat16 | float32 (parameters stay float32)
  c.model.remat = "none"  # none | mlp (recompute GELU) | block | block_save_dots
  c.model.scan_blocks = False  # True: blocks as one lax.scan (compiles 3x faster, steps 1.4x slower on an H200)
  c.model.dropout_rng = "hash"  # hash | threefry | rbg: dropout bits (BENCHMARKS.md)
  # the residual stream between blocks: auto (bfloat16 under bf16 compute on GPUs, else float32)
  # | float32 | bfloat16
  c.model.residual_dtype = "auto"
  c.model.matmul = "default"  # default (in model.dtype) | fp8 (FP8 GPUs; else the default)
  # LayerNorm + modulate: auto (pallas in bf16 on Ampere+ GPUs, else reference) | reference |
  # xla | pallas (fused, hand-written backward; BENCHMARKS.md)
  c.model.norm_impl = "auto"
  # GELU backward: saved_input (keeps only its input, as torch does) | reference (autodiff)
  c.model.gelu_impl = "saved_input"
  # gate gradients of the residual adds x + gate * y: blocked (a two-stage sum without XLA's
  # (B, L, H) -> (B, H, L) transposes: 2-3% faster step on an H200; BENCHMARKS.md) | xla
  # (autodiff)
  c.model.gate_grad = "blocked"

  c.data = ml_collections.ConfigDict()
  c.data.fasta = "data/uniprot_mmseqs2_example.fasta.gz"  # source, prepared on first use
  c.data.prepared = "data/prepared/uniprot"  # store written by sedd_jax.data.prepare
  c.data.min_length = 30
  c.data.max_length = 1000
  c.data.min_standard_fraction = 0.95
  c.data.valid_fraction = 0.02
  c.data.test_fraction = 0.02
  c.data.bucket_boundaries = ()  # () = chosen from the model length
  c.data.pad_to = "pack"  # pack (sequences share rows) | full (width L) | bucket (width = bucket)
  c.data.pack_bins = 1024  # pad_to=pack: rows packed at a time (more = less padding)

  c.training = ml_collections.ConfigDict()
  c.training.batch_size = 64  # global batch, in sequences
  c.training.accum = 1  # micro-batches per step (batch_size must divide by it)
  c.training.steps = 1_300_000
  c.training.ema = 0.9999
  c.training.log_every = 50
  c.training.eval_every = 5000
  c.training.eval_batches = 8
  c.training.sample_every = 10000
  c.training.num_samples = 4
  c.training.ckpt_every = 5000
  c.training.keep = 3
  c.training.milestone_every = 100_000
  c.training.max_bad_steps = 10  # consecutive non-finite steps before the run stops
  c.training.fsdp = False  # shard parameters over the data axis
  # jax's persistent compilation cache ("" = off; JAX_COMPILATION_CACHE_DIR, when set, wins):
  # a rerun or a resume of the same shapes loads its compiled steps instead of compiling them
  c.training.compile_cache = "~/.cache/sedd_jax/jax"
  c.training.time_eps = 1e-3  # t ~ U[time_eps, 1)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.beta1 = 0.9
  c.optim.beta2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.warmup = 2500
  c.optim.schedule = "constant"  # constant | cosine
  c.optim.clip = 1.0

  c.sampling = ml_collections.ConfigDict()
  c.sampling.steps = 128
  c.sampling.predictor = "analytic"  # analytic | euler | first_hitting (absorbing graph)
  c.sampling.eps = 1e-5

  c.wandb = ml_collections.ConfigDict()
  c.wandb.mode = "offline"  # offline | online | disabled
  c.wandb.project = "sedd_jax"
  c.wandb.name = ""
  return c


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the config of `variant` (one of VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/uniref50.py; choose one of {VARIANTS}")
  c = base_config()
  c.variant = variant
  if variant == "tiny":
    c.model.update(hidden_size=64, n_heads=4, n_blocks=2, cond_dim=32, dropout=0.0, length=128,
                   dtype="float32", scan_blocks=False)  # 2 blocks: a scan compiles slower
    c.data.pad_to = "full"  # at L 128 most bundled sequences fill the row (5% padding)
    c.training.update(batch_size=32, steps=600, log_every=25, eval_every=100, eval_batches=4,
                      sample_every=300, ckpt_every=200, milestone_every=0)
    c.optim.update(lr=2e-3, warmup=50)
    c.sampling.steps = 64
  elif variant == "small":
    c.model.length = 1024
    c.training.batch_size = 64
  elif variant == "medium":
    c.model.update(hidden_size=1024, n_heads=16, n_blocks=24, cond_dim=128)
  elif variant == "protlig_stable":
    c.model.update(hidden_size=768, cond_dim=256, n_blocks=8, n_heads=12, length=512)
    c.noise.update(type="cosine", sigma_min=1e-4, sigma_max=0.5)
    c.optim.update(lr=5e-5, warmup=10_000, clip=0.5)
    c.training.ema = 0.9995
    c.curriculum.update(kind="time_bias", ramp="linear", preschool_time=20_000)
  return c
