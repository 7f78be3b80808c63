"""The family contract: every registered model family passes the same checks.

Every test is parametrised over ``models.list_models()``, so a family gets all of them by
registering, and a check the pipeline relies on is written once rather than once per family
file. Each family is its ``debug`` flavor at 32 px, built the way the pipeline builds it: a
second-stage family (its config names a parent) on a debug VQ-VAE whose weights are loaded as
the worker loads them, a growing family at its last stage, fading in from the one below (both
image paths run). The per-family files keep what is specific to one family: values, layouts,
options, overfitting.

1. forward: loss, recon, kl, elbo finite scalars; elbo as the family's objective defines it;
   x_hat images of x's shape; metrics finite scalars; evaluation's accumulator reads it.
2. a trainer-style step: finite loss; every trainable parameter gets a finite, nonzero
   gradient; the only frozen parameters are a declared parent's, which stays in eval mode and
   unchanged. A gradient may be zero only behind a parameter initialised at exactly zero
   (VDVAE's zero-initialised prior convs), and must appear once those move.
3. encode / decode / reconstruct / sample: shapes, images in [0, 1], no gradient.
4. ``log_likelihood_terms``: log p(x|z), log p(z), log q(z|x), each [B], finite.
5. bf16 cast as DeepSpeed casts (parameters only): fp32 loss math, the same gradients reach
   the same parameters, images in bf16 and in [0, 1].
6. what the pipeline probes with hasattr/getattr behaves as the pipeline uses it:
   ``checkpoint_blocks`` (activation checkpointing), ``build_auxiliary`` (second optimizer),
   ``set_stat_reducer`` (statistics summed over ranks), ``encode`` + ``log_likelihood_terms``
   and ``latent_kind`` (evaluation's IWAE, units, traversals), ``default_ema_rate`` /
   ``samples_at_temperature`` (config, serving), ``set_alpha`` / ``new_parameter_names``
   (progressive growth).
7. off-loop validation's scoring of a checkpoint's weights (``checkpoint_validation.score``).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn

import models
from pipeline.config import PROGRESSIVE_FAMILIES, load_config, to_dict
from pipeline.evaluate.diagnostics import ELBOAccumulator
from pipeline.evaluate.likelihood import iwae_log_likelihood
from pipeline.evaluate.runner import LATENT_KINDS, has_gaussian_latent, model_input_shape
from pipeline.evaluate.visualize import interpolate, latent_traversals
from pipeline.train.activation import apply_activation_checkpointing
from pipeline.train.auxiliary import AuxiliaryTrainer
from model_helpers import like_deepspeed_bf16

FAMILIES = models.list_models()
RESOLUTION = 32
# 4 images: unlike the channel count (3) and the debug latent / code widths (8), so a tensor
# split along the wrong dimension cannot pass a shape check by coincidence.
BATCH = 4
FADE_ALPHA = 0.5  # a growing family mid-fade: the new block and the upsampled lower stage both run
SCALARS = ("loss", "recon", "kl", "elbo")
OBJECTIVES = ("neg_elbo", "neg_objective", "code_nll")

@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, single-threaded: these tiny models gain nothing from threads, and two spinning
    intra-op threads on a loaded 2-core machine slow a step down many times."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- building


def _growing(name: str) -> bool:
    """Families that grow stage by stage declare ``set_alpha`` (pipeline.train.growth calls it)."""
    return models.family_default(name, "set_alpha", None) is not None


def _parent_vqvae() -> nn.Module:
    """A debug VQ-VAE whose codebook saw one batch (dead codes restarted from encoder outputs,
    so the codes of random images vary)."""
    cfg = load_config(None, ["model.name=vqvae", "model.flavor=debug", f"data.resolution={RESOLUTION}"])
    parent = models.build_model(cfg.model)
    with torch.no_grad():
        parent.train()(torch.rand(8, cfg.data.channels, RESOLUTION, RESOLUTION))
    return parent.eval()


def build(name: str, stage: int = RESOLUTION) -> nn.Module:
    """The family's debug model at 32 px, built as the pipeline builds it (see the module docstring)."""
    cfg = load_config(None, [f"model.name={name}", "model.flavor=debug", f"data.resolution={RESOLUTION}"])
    model_cfg = to_dict(cfg)["model"]
    if _growing(name):  # as pipeline.train.growth.build_stage_model
        model_cfg.update(stage_resolution=stage, start_resolution=cfg.progressive.start_resolution)
    parent = None
    if "parent_config" in (models.resolve_model_config(model_cfg).get("ar") or {}):
        # model.ar.parent_uri resolved: the parent's config, then its weights (pipeline.train.worker)
        parent = _parent_vqvae()
        model_cfg["ar"]["parent_config"] = {"name": "vqvae", **parent.config}
    torch.manual_seed(0)
    model = models.build_model(model_cfg)
    if parent is not None:
        model.parent.load_state_dict(parent.state_dict())
    if _growing(name):
        model.set_alpha(FADE_ALPHA)
    return model


def images(model: nn.Module, n: int = BATCH) -> torch.Tensor:
    """n random images of the shape the model reads (a second stage reads its parent's)."""
    channels, resolution = model_input_shape({"name": model.model_name, **model.config})
    resolution = getattr(model, "resolution", resolution)  # a growing family reads its stage's
    return torch.rand(n, channels, resolution, resolution)


def auxiliary(model: nn.Module) -> nn.Module | None:
    """The auxiliary network the trainer builds for a family that declares one (pipeline.train.auxiliary)."""
    return model.build_auxiliary() if hasattr(model, "build_auxiliary") else None


def train_forward(model: nn.Module, x: torch.Tensor, aux: nn.Module | None, seed: int = 1) -> dict:
    """The forward call of pipeline.train.step (KL weight, free bits, the auxiliary network)."""
    torch.manual_seed(seed)
    return model(x, beta=1.0, free_bits=0.0, aux=aux)


def declared_frozen(model: nn.Module) -> set[int]:
    """Parameters a family declares frozen: those of its ``parent`` (a second stage's first stage)."""
    parent = getattr(model, "parent", None)
    return {id(p) for p in parent.parameters()} if isinstance(parent, nn.Module) else set()


def silent_parameters(model: nn.Module) -> set[str]:
    """Names of trainable parameters whose gradient is all zero; asserts every trainable one has a
    finite gradient and no frozen one has any."""
    silent = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
            continue
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad.float()).all(), f"non-finite gradient in {name}"
        if not p.grad.any():
            silent.add(name)
    return silent


def submodules_of(parameter: str) -> list[str]:
    """The names of the modules that hold a parameter, innermost first, the model itself left out."""
    parts = parameter.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers a forward may update (codebooks, EMA counts), less normalisation layers' running
    statistics, which every rank keeps for itself."""
    norm = {f"{prefix}.{b}" if prefix else b
            for prefix, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            for b, _ in m.named_buffers(recurse=False)}
    return {n: b.detach().clone() for n, b in model.named_buffers() if n not in norm}


def assert_images(t: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> None:
    assert tuple(t.shape) == tuple(shape), (tuple(t.shape), tuple(shape))
    assert t.is_floating_point() and not t.requires_grad
    assert dtype is None or t.dtype == dtype, (t.dtype, dtype)
    assert torch.isfinite(t.float()).all()
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0, (float(t.min()), float(t.max()))


def posterior_latent(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One z ~ q(z|x) in the form the family's ``log_likelihood_terms`` takes, drawn as evaluation
    draws it (``likelihood._draw_posterior``): the family's own ``sample_posterior`` (vdvae's
    groups, the VQ families' codes) or mu + σ·ε from encode's (mu, logvar)."""
    if hasattr(model, "sample_posterior"):
        return model.sample_posterior(x)
    mu, logvar = model.encode(x)
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


# ----------------------------------------------------------------------------- 1-5: the protocol


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_reports_finite_scalars_and_images_of_the_input_shape(name):
    model = build(name).eval()
    x = images(model)
    with torch.no_grad():
        torch.manual_seed(1)
        out = model(x)  # as evaluation calls it
    for key in SCALARS:
        assert out[key].shape == () and torch.isfinite(out[key]), (key, out[key])
    assert out["kl_per_dim"].dim() == 1 and torch.isfinite(out["kl_per_dim"]).all()
    objective = models.objective_name({"name": name, **model.config})
    assert objective in OBJECTIVES
    if objective == "code_nll":  # the log-probability of discrete codes
        assert out["elbo"] <= 0
    else:
        torch.testing.assert_close(out["elbo"], -(out["recon"] + out["kl"]))
    if "x_hat" in out:
        assert_images(out["x_hat"], x.shape)
    for key, value in out["metrics"].items():
        value = torch.as_tensor(value)
        assert value.dim() == 0 and torch.isfinite(value), key
    result = ELBOAccumulator().update(out).compute()
    assert result["elbo"] == pytest.approx(float(out["elbo"]), rel=1e-6)
    assert result["num_samples"] == BATCH


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_is_finite_and_gradients_reach_every_trainable_parameter(name):
    model = build(name).train()
    x = images(model)
    frozen = declared_frozen(model)
    assert {id(p) for p in model.parameters() if not p.requires_grad} == frozen
    parent_state = {k: v.clone() for k, v in model.parent.state_dict().items()} if frozen else {}
    if frozen:  # a frozen parent stays in eval mode, so its BatchNorm / codebook statistics never move
        assert not any(m.training for m in model.parent.modules())
    out = train_forward(model, x, auxiliary(model))
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    silent = silent_parameters(model)
    if silent:
        # Only a parameter initialised at exactly zero in the same submodule may hide others at
        # init (an output layer zero-initialised on purpose): once those move, every gradient
        # must appear.
        zero_init = {n for n, p in model.named_parameters() if p.requires_grad and not p.any()}
        unexplained = [n for n in sorted(silent) if not any(
            z.startswith(module + ".") for module in submodules_of(n) for z in zero_init)]
        assert not unexplained, f"no gradient reaches {unexplained}"
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in zero_init:
                    p.normal_(0.0, 1e-2)
        model.zero_grad(set_to_none=True)
        train_forward(model, x, auxiliary(model))["loss"].backward()
        assert silent_parameters(model) == set(), "gradients still zero with no zero-initialised parameter"
    for key, value in parent_state.items():
        assert torch.equal(model.parent.state_dict()[key], value), f"frozen parent's {key} moved"


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_decode_reconstruct_and_sample_give_images(name):
    model = build(name).eval()
    x = images(model)
    with torch.no_grad():
        encoded = model.encode(x)
    if isinstance(encoded, tuple):  # a Gaussian posterior: (mu, logvar), each [B, D]
        mu, logvar = encoded
        assert mu.dim() == 2 and mu.shape[0] == BATCH and logvar.shape == mu.shape
        assert torch.isfinite(mu).all() and torch.isfinite(logvar).all()
        latent = mu
    else:  # a discrete latent: a code grid, one per image
        latent = encoded
        assert latent.shape[0] == BATCH
    with torch.no_grad():
        assert_images(model.decode(latent), x.shape)
    recon = model.reconstruct(x)
    assert_images(recon, x.shape)
    assert torch.equal(recon, model.reconstruct(x))  # deterministic in eval mode
    assert_images(model.sample(3), (3, *x.shape[1:]))
    assert_images(model.sample(2, device="cpu"), (2, *x.shape[1:]))  # as train.observe calls it


@pytest.mark.parametrize("name", FAMILIES)
def test_log_likelihood_terms_are_finite_per_sample(name):
    model = build(name).eval()
    if not hasattr(model, "log_likelihood_terms"):
        pytest.skip(f"{name} has no log_likelihood_terms")
    x = images(model)
    with torch.no_grad():
        terms = model.log_likelihood_terms(x, posterior_latent(model, x))
    assert {"log_px_z", "log_pz", "log_qz_x"} <= set(terms)
    for key in ("log_px_z", "log_pz", "log_qz_x"):
        t = terms[key]
        assert t.shape == (BATCH,) and t.dtype in (torch.float32, torch.float64), (key, t.shape, t.dtype)
        assert torch.isfinite(t).all(), (key, t)


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_cast_like_deepspeed_trains_samples_and_reconstructs(name):
    fp32 = build(name).train()
    bf16 = like_deepspeed_bf16(copy.deepcopy(fp32))
    x = images(fp32)
    aux = auxiliary(fp32)  # the trainer keeps the auxiliary network in fp32 whatever the precision
    train_forward(fp32, x, aux)["loss"].backward()
    out = train_forward(bf16, x.to(torch.bfloat16), aux)
    for key in SCALARS:  # the loss math runs in fp32 (exp(logvar), pixel sums)
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]), (key, out[key])
    assert out["loss"].requires_grad
    out["loss"].backward()
    assert silent_parameters(bf16) == silent_parameters(fp32)
    bf16.eval()
    samples, recon = bf16.sample(3), bf16.reconstruct(x.to(torch.bfloat16))
    assert_images(samples, (3, *x.shape[1:]), torch.bfloat16)  # images in the model's dtype
    assert_images(recon, x.shape, torch.bfloat16)


# ----------------------------------------------------------------------------- 6: what the pipeline probes


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_blocks_recompute_to_the_same_loss_gradients_and_statistics(name):
    model = build(name).train()
    if not hasattr(model, "checkpoint_blocks"):
        with pytest.raises(ValueError, match="checkpoint_blocks"):
            apply_activation_checkpointing(model)  # train.activation_checkpointing=true is refused
        return
    blocks = [block for group in model.checkpoint_blocks() for block in group]
    own = {id(m) for m in model.modules()}
    assert blocks and all(isinstance(b, nn.Module) and id(b) in own for b in blocks)
    assert len({id(b) for b in blocks}) == len(blocks), "a block listed twice would be wrapped twice"
    wrapped = copy.deepcopy(model)
    assert apply_activation_checkpointing(wrapped) == len(blocks)
    x = images(model)
    results = []
    for m in (model, wrapped):
        out = train_forward(m, x, None)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((out["loss"].detach(), grads, statistics(m)))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for n, g in grads_a.items():
        torch.testing.assert_close(grads_b[n], g, rtol=1e-5, atol=1e-6, msg=n)
    for n, s in stats_a.items():  # a stateful module inside a block would update twice
        assert torch.equal(stats_b[n], s), n


@pytest.mark.parametrize("name", FAMILIES)
def test_auxiliary_network_trains_beside_the_model_with_its_own_loss(name):
    model = build(name).train()
    trainer = AuxiliaryTrainer.for_model(model, torch.device("cpu"))
    if not hasattr(model, "build_auxiliary"):
        assert trainer is None
        return
    aux = trainer.module
    assert isinstance(aux, nn.Module) and model.build_auxiliary() is not aux  # a fresh network per call
    aux_params = list(aux.parameters())
    assert aux_params and not {id(p) for p in aux_params} & {id(p) for p in model.parameters()}
    x = images(model)
    plain, out = train_forward(model, x, None), train_forward(model, x, aux)
    assert not torch.equal(out["loss"], plain["loss"])  # the auxiliary network's term enters the loss
    out["loss"].backward()  # the model's step comes first (pipeline.train.step)
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in aux_params]
    metrics = trainer.step(model, out)
    assert metrics["disc_skipped"] == 0.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics
    moved = [not torch.equal(p, b) for p, b in zip(aux_params, before)]
    assert all(moved), "every auxiliary parameter gets a gradient from auxiliary_loss"
    assert all(p.grad is None for p in model.parameters()), "auxiliary_loss must not reach the model"


@pytest.mark.parametrize("name", FAMILIES)
def test_statistics_a_forward_updates_are_summed_over_ranks(name):
    """Per-rank state a train-mode forward changes would drift apart across ranks unless the
    family takes the worker's ``set_stat_reducer`` (a sum over ranks)."""
    model = build(name).train()
    x = images(model)
    before = statistics(model)

    def after_forward(reducer=None, hook=True):
        m = copy.deepcopy(model)
        if hook:
            m.set_stat_reducer(reducer)
        torch.manual_seed(1)
        with torch.no_grad():
            m(x)
        return statistics(m)

    if not hasattr(model, "set_stat_reducer"):
        after = after_forward(hook=False)
        assert [n for n in before if not torch.equal(before[n], after[n])] == []
        return
    calls = []

    def one_rank(t):
        calls.append(t.shape)
        return t

    alone, summed, two_ranks = after_forward(None), after_forward(one_rank), after_forward(lambda t: 2 * t)
    assert calls, "the statistics never went through the reducer"
    assert any(not torch.equal(before[n], alone[n]) for n in before)
    assert all(torch.equal(alone[n], summed[n]) for n in alone)  # a sum over one rank changes nothing
    assert any(not torch.equal(alone[n], two_ranks[n]) for n in alone)  # the reducer's sum is what is used


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluation_bounds_every_family_with_iwae(name):
    """``nll`` / ``neg_iwae_nats`` (default metrics) run iwae_log_likelihood on every family, unprobed."""
    model = build(name).eval()
    x = images(model)
    for i in range(2):  # one image at a time, as runner.score_partition scores them
        torch.manual_seed(1)
        bound = iwae_log_likelihood(model, x[i : i + 1], k=4, batch_k=2)
        assert bound.shape == (1,) and bound.dtype == torch.float64 and torch.isfinite(bound).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluation_reads_codes_traversals_and_interpolations_of_the_latent(name):
    model = build(name).eval()
    if not has_gaussian_latent(model):
        kind = models.family_default(name, "latent_kind", "gaussian")
        assert kind in LATENT_KINDS and kind != "gaussian"  # declared, not missing
        pytest.skip(f"{name}'s latent is {LATENT_KINDS[kind]}: evaluation reads no units from it")
    x = images(model)
    with torch.no_grad():
        codes = model.encode(x)[0]  # runner.score_partition: one row of codes per image
        torch.manual_seed(1)
        kl = model(x)["kl_per_dim"]
    assert codes.dim() == 2 and codes.shape[0] == BATCH, tuple(codes.shape)
    top = torch.argsort(kl, descending=True)[:2].tolist()  # job.log_visuals: the most informative units
    frames = latent_traversals(model, x[0], dims=top, steps=3)
    assert frames.shape == (len(top), 3, *x.shape[1:]) and 0 <= frames.min() and frames.max() <= 1
    path = interpolate(model, x[0], x[1], steps=3, mode="slerp")
    assert path.shape == (3, *x.shape[1:]) and 0 <= path.min() and path.max() <= 1


@pytest.mark.parametrize("name", FAMILIES)
def test_kl_per_dim_has_one_entry_per_latent_unit(name):
    """Evaluation ranks units by ``kl_per_dim`` and traverses those dims of encode's mu, for the
    families whose latent is one Gaussian vector (the others declare what theirs is)."""
    model = build(name).eval()
    if not has_gaussian_latent(model):
        pytest.skip(f"{name}'s latent is {LATENT_KINDS[models.family_default(name, 'latent_kind', 'gaussian')]}")
    x = images(model)
    with torch.no_grad():
        torch.manual_seed(1)
        kl = model(x)["kl_per_dim"]
        if kl.numel() == 0:
            pytest.skip(f"{name} reports no per-unit KL (no continuous latent)")
        mu = model.encode(x)[0]
    assert kl.shape == (mu.shape[1],), (tuple(kl.shape), tuple(mu.shape))


@pytest.mark.parametrize("name", FAMILIES)
def test_declared_defaults_and_options_are_what_the_pipeline_applies(name):
    # pipeline.config: train.ema_rate left unset takes the family's default_ema_rate
    rate = models.family_default(name, "default_ema_rate", None)
    assert rate is None or 0 < rate < 1
    cfg = load_config(None, [f"model.name={name}", "model.flavor=debug", f"data.resolution={RESOLUTION}"])
    assert cfg.train.ema_rate == (0.0 if rate is None else rate)
    # pipeline.serving passes a temperature only to families that declare samples_at_temperature
    model = build(name).eval()
    takes_temperature = "temperature" in inspect.signature(model.sample).parameters
    assert bool(getattr(model, "samples_at_temperature", False)) == takes_temperature
    if takes_temperature:
        torch.manual_seed(1)
        cold = model.sample(2, temperature=0.0)
        torch.manual_seed(2)
        assert torch.equal(model.sample(2, temperature=0.0), cold)  # temperature 0: no draw at all
        assert_images(cold, (2, *images(model).shape[1:]))


@pytest.mark.parametrize("name", FAMILIES)
def test_growth_hooks_match_the_progressive_config(name):
    # progressive.enabled=true is accepted exactly for the families that can grow
    assert (name in PROGRESSIVE_FAMILIES) == _growing(name)
    if not _growing(name):
        return
    model, previous = build(name), build(name, stage=RESOLUTION // 2)
    state, earlier = model.state_dict(), previous.state_dict()
    # pipeline.train.growth copies the earlier parameters over by name (the image layers of the
    # stage two below drop out) and knows the new ones by new_parameter_names
    kept = set(earlier) & set(state)
    assert kept and all(state[k].shape == earlier[k].shape for k in kept)
    assert set(model.new_parameter_names()) == set(state) - set(earlier) != set()
    for alpha in (-0.1, 1.1):
        with pytest.raises(ValueError, match="alpha"):
            model.set_alpha(alpha)


@pytest.mark.parametrize("name", [n for n in FAMILIES if not _growing(n)])
def test_the_validation_task_scores_every_fixed_resolution_family(name, shards32):
    """Off-loop validation (``checkpoint_validation.score``) scores every fixed-resolution family
    from its weights as a checkpoint holds them: the objective and its terms finite, recon + KL
    equal to the objective."""
    from pipeline.train.checkpoint_validation import score
    from pipeline.train.export import weights_blob

    model = build(name)
    cfg = load_config(None, [f"model.name={name}", "model.flavor=debug", "data.resolution=32",
                             f"data.path={shards32}", "data.batch_size=4", "train.val_k=2", "train.val_max_samples=4"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    metrics, objective = score(weights_blob({"name": name, **model.config}, state, to_dict(cfg)), cfg)
    assert objective == f"val_{models.objective_name(load_config(None, [f'model.name={name}']).model)}"
    assert metrics["val_num_samples"] == 4
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    if objective != "val_code_nll":  # a bound (or objective) of reconstruction and KL terms
        assert metrics["val_recon"] + metrics["val_kl"] == pytest.approx(metrics[objective], rel=1e-4, abs=1e-3)
