"""Metrics: plain functions of point sets and score functions, plus gin-bindable metric suites.

A metric suite is ``suite(evaluation) -> dict[str, float]``; ``evaluate.suites`` lists the suites
to run. Keys read ``{method}/c{class}/{metric}`` (``/s{sigma}`` appended for per-sigma metrics).

k-NN precision/recall and sliced Wasserstein are written here rather than taken from torchmetrics:
torchmetrics has image-feature metrics (FID, IS) but neither of these for raw point sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gin
import torch
from torch import nn

from dlsm.data.points import LabelledData
from dlsm.errors import ConfigError
from dlsm.math.oracle import OracleScores
from dlsm.math.schedules import NoiseSchedule
from dlsm.math.scores import ModelScores, PosteriorSMScores, likelihood_score

__all__ = [
    "Evaluation",
    "LikelihoodScoreTracker",
    "classifier_metrics",
    "grid_points",
    "heldout_metrics",
    "kth_nn_distance",
    "mean_score_distance",
    "precision_recall",
    "sample_metrics",
    "score_error_metrics",
    "sliced_wasserstein",
]


@dataclass
class Evaluation:
    """Everything a metric suite or plot may look at after training and sampling."""

    data: LabelledData
    schedule: NoiseSchedule
    methods: dict[str, ModelScores | PosteriorSMScores | OracleScores]
    classifiers: dict[str, nn.Module] = field(default_factory=dict)
    samples: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    oracle: OracleScores | None = None
    seed: int = 0
    # image experiments (dlsm.eval.images.image_metrics): the test split, where networks run, the cache of the
    # evaluator and of real-data features, the features streamed while sampling, and the feature networks
    test_data: Callable[[], object] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache_dir: Path = Path(".dlsm/cache")
    stream: object | None = None
    feature_nets: Callable[[], list] = list
    artifacts: dict[str, object] = field(default_factory=dict)  # suites' tables / figures, logged by evaluate

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)


def mean_score_distance(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """E ||estimate - reference||_2, the DLSM paper's E[D_P] / E[D_L] for matched point sets."""
    diff = (estimate.to(torch.float64) - reference.to(torch.float64)).reshape(estimate.shape[0], -1)
    return float(diff.norm(dim=1).mean())


def _pairwise_min_over(a: torch.Tensor, b: torch.Tensor, fn, chunk: int = 2048) -> torch.Tensor:
    out = []
    for s in range(0, a.shape[0], chunk):
        out.append(fn(torch.cdist(a[s : s + chunk], b)))
    return torch.cat(out)


def kth_nn_distance(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    return _pairwise_min_over(x, x, lambda d: d.kthvalue(k + 1, dim=1).values)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, *, k: int = 5) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN balls.

    precision = fraction of fake points inside some real k-NN ball; recall = the converse.
    """
    real = real.reshape(real.shape[0], -1).to(torch.float64)
    fake = fake.reshape(fake.shape[0], -1).to(torch.float64)
    r_real, r_fake = kth_nn_distance(real, k), kth_nn_distance(fake, k)
    precision = _pairwise_min_over(fake, real, lambda d: (d <= r_real[None, :]).any(dim=1))
    recall = _pairwise_min_over(real, fake, lambda d: (d <= r_fake[None, :]).any(dim=1))
    return float(precision.double().mean()), float(recall.double().mean())


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, *, n_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced Wasserstein-1: mean over random unit directions of W1 between the 1-D projections.

    Each 1-D W1 = int_0^1 |F_a^-1(q) - F_b^-1(q)| dq is computed exactly: both empirical quantile
    functions (F^-1(q) = sorted[ceil(q m) - 1] for m points) are constant between the union of their
    breakpoints {i/m_a} and {j/m_b}.
    """
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    dirs = torch.randn(a.shape[1], n_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(dim=0).values, (b @ dirs).sort(dim=0).values
    ma, mb = pa.shape[0], pb.shape[0]
    edges = torch.cat([torch.arange(ma + 1, dtype=torch.float64) / ma, torch.arange(mb + 1, dtype=torch.float64) / mb])
    edges = torch.unique(edges)  # sorted union of both quantile functions' breakpoints
    width, mid = edges[1:] - edges[:-1], (edges[1:] + edges[:-1]) / 2
    qa, qb = pa[_quantile_index(mid, ma)], pb[_quantile_index(mid, mb)]
    return float((width[:, None] * (qa - qb).abs()).sum(dim=0).mean())


def _quantile_index(q: torch.Tensor, m: int) -> torch.Tensor:
    """Index of the empirical q-quantile in m sorted values: ceil(q m) - 1."""
    return (torch.ceil(q * m) - 1).long().clamp(0, m - 1)


def _noisy_class_points(ev: Evaluation, c: int, sigma: float, n: int, g: torch.Generator) -> torch.Tensor:
    """x~ ~ p_sigma(x~|y=c): class data (resampled) plus sigma-noise."""
    xc = ev.data.of_class(c)
    idx = torch.randint(0, xc.shape[0], (n,), generator=g)
    return xc[idx] + sigma * torch.randn(xc[idx].shape, generator=g)


def grid_points(
    grid_size: int, xlim: tuple[float, float], ylim: tuple[float, float]
) -> torch.Tensor:
    """A grid_size x grid_size grid over xlim x ylim, as (grid_size^2, 2) points (row-major in y)."""
    gx, gy = torch.meshgrid(torch.linspace(*xlim, grid_size), torch.linspace(*ylim, grid_size), indexing="xy")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


@gin.configurable
def score_error_metrics(
    ev: Evaluation,
    *,
    sigmas: tuple[float, ...] = (1.0, 7.5),
    n_points: int = 2000,
    grid_size: int | None = 35,
    xlim: tuple[float, float] = (-40.0, 40.0),
    ylim: tuple[float, float] = (-25.0, 25.0),
    methods: Sequence[str] | None = None,
) -> dict[str, float]:
    """E[D_P] and E[D_L] against the Parzen oracle, per method, class and sigma, over two point sets:
    x~ ~ p_sigma(x~|y) (keys ``D_P``, ``D_L``) and, for 2-D data with ``grid_size`` set, a fixed
    grid covering the data with a margin (keys ``D_P_grid``, ``D_L_grid``; the official toy code
    uses 35 x 35 points on [-40, 40] x [-25, 25]), where the true likelihood score is far from zero.
    Also ``alpha_star``: the least-squares scale a* = <l, l*> / <l, l> that would best map the method's
    likelihood term l onto the oracle's l* (> 1 means the method's likelihood scores are too weak).
    ``methods`` limits the methods scored (default: all but the oracle), e.g. one alpha = 1 point per classifier.
    """
    if ev.oracle is None:
        return {}
    unknown = sorted(set(methods or ()) - set(ev.methods))
    if unknown:
        raise ConfigError(f"score_error_metrics.methods: {unknown[0]!r} is not a method of the experiment "
                          f"({sorted(ev.methods)})")
    chosen = {n: m for n, m in ev.methods.items() if methods is None or n in methods}
    out: dict[str, float] = {}
    g = ev.generator(101)
    grid = grid_points(grid_size, xlim, ylim) if grid_size and ev.data.dim == 2 else None
    for sigma in sigmas:
        for c in range(ev.data.num_classes):
            point_sets = {"": _noisy_class_points(ev, c, sigma, n_points, g)}
            if grid is not None:
                point_sets["_grid"] = grid.reshape(-1, *ev.data.x.shape[1:])
            for suffix, x in point_sets.items():
                true_post = ev.oracle.posterior(x, sigma, c)
                true_lik = true_post - ev.oracle.prior(x, sigma)
                for name, scores in chosen.items():
                    if scores is ev.oracle:
                        continue
                    lik = scores.likelihood(x, sigma, c)
                    post = scores.prior(x, sigma) + lik
                    out[f"{name}/c{c}/D_P{suffix}/s{sigma:g}"] = mean_score_distance(post, true_post)
                    out[f"{name}/c{c}/D_L{suffix}/s{sigma:g}"] = mean_score_distance(lik, true_lik)
                    out[f"{name}/c{c}/alpha_star{suffix}/s{sigma:g}"] = _ls_scale(lik, true_lik)
    return out


def _ls_scale(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """argmin_a ||a estimate - reference||^2 over all points, in float64."""
    e, r = estimate.to(torch.float64).reshape(-1), reference.to(torch.float64).reshape(-1)
    denom = float(e @ e)
    return float(e @ r) / denom if denom > 0 else float("nan")


@gin.configurable
class LikelihoodScoreTracker:
    """Training curves for the DLSM paper's ablation (Figure 5): called on a classifier during
    training, returns (a) its likelihood-score error E[D_L] against the Parzen oracle and (b) its
    cross-entropy, at each sigma in ``sigmas``, averaged over classes.

    The evaluation points and the oracle's scores are fixed at construction, so every call and every
    training run (seed, loss) is measured on the same points. Keys: ``track/D_L/s{sigma}``
    (x~ ~ p_sigma(x~|y)), ``track/D_L_grid/s{sigma}`` (the fixed grid, 2-D data), ``track/ce/s{sigma}``.
    """

    def __init__(
        self,
        data: LabelledData,
        *,
        sigmas: tuple[float, ...] = (7.5,),
        n_points: int = 2000,
        grid_size: int | None = 35,
        xlim: tuple[float, float] = (-40.0, 40.0),
        ylim: tuple[float, float] = (-25.0, 25.0),
        seed: int = 0,
    ) -> None:
        oracle = OracleScores(data.x, data.y)
        ev = Evaluation(data, None, {}, seed=seed)  # type: ignore[arg-type]
        g = ev.generator(404)
        grid = grid_points(grid_size, xlim, ylim) if grid_size and data.dim == 2 else None
        self.sigmas, self.num_classes = tuple(float(s) for s in sigmas), data.num_classes
        self.points: dict[tuple[str, float, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.ce_points: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        for sigma in self.sigmas:
            for c in range(data.num_classes):
                sets = {"D_L": _noisy_class_points(ev, c, sigma, n_points, g)}
                if grid is not None:
                    sets["D_L_grid"] = grid.reshape(-1, *data.x.shape[1:])
                for key, x in sets.items():
                    self.points[key, sigma, c] = (x, oracle.likelihood(x, sigma, c))
            idx = torch.randint(0, data.x.shape[0], (n_points,), generator=g)
            self.ce_points[sigma] = (data.x[idx] + sigma * torch.randn(data.x[idx].shape, generator=g), data.y[idx])

    def __call__(self, classifier: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for (key, sigma, c), (x, true_lik) in self.points.items():
            labels = torch.full((x.shape[0],), c, dtype=torch.long)
            d = mean_score_distance(likelihood_score(classifier, x, sigma, labels), true_lik)
            name = f"track/{key}/s{sigma:g}"
            out[name] = out.get(name, 0.0) + d / self.num_classes
        for sigma, (x, y) in self.ce_points.items():
            with torch.no_grad():
                out[f"track/ce/s{sigma:g}"] = float(nn.functional.cross_entropy(classifier(x, sigma), y))
        return out


@gin.configurable
def classifier_metrics(
    ev: Evaluation, *, sigmas: tuple[float, ...] = (1.0, 7.5), n_points: int = 4000
) -> dict[str, float]:
    """Cross-entropy and accuracy of each classifier on x~ ~ p_sigma(x~, y) at each sigma."""
    out: dict[str, float] = {}
    g = ev.generator(202)
    for sigma in sigmas:
        idx = torch.randint(0, len(ev.data), (n_points,), generator=g)
        x0, y = ev.data.batch(idx)  # only these rows in float (ImageData.x would convert the whole dataset)
        x, y = x0.cpu() + sigma * torch.randn(x0.shape, generator=g), y.cpu()
        for name, clf in ev.classifiers.items():
            dev = next(clf.parameters()).device  # the experiment's device; the data stay on the CPU
            with torch.no_grad():
                logits = clf(x.to(dev), sigma).cpu()
            out[f"{name}/ce/s{sigma:g}"] = float(nn.functional.cross_entropy(logits, y))
            out[f"{name}/acc/s{sigma:g}"] = float((logits.argmax(1) == y).double().mean())
    return out


@gin.configurable
def heldout_metrics(
    ev: Evaluation, *, sigmas: tuple[float, ...] = (0.1, 0.5, 1.0), n_points: int = 1000
) -> dict[str, float]:
    """Each classifier on the held-out test split, at each sigma (DLSM paper, the mechanism behind Table 2):
    ``{clf}/heldout/dlsm/s{sigma}`` = E[1/2 ||grad_x~ log p(y|x~; theta) + s(x~; phi) - grad_x~ log p_sigma(x~|x)||^2]
    (L_DLSM' of the paper at one sigma, unweighted, ||.||^2 summed over pixels: how well prior + likelihood
    score matches the posterior's denoising target on data the classifier never saw), and the cross-entropy
    ``.../ce/``, accuracy ``.../acc/`` and expected calibration error ``.../ece/`` (15 bins) there. The same x, z
    for every classifier. Needs image data (a test split) and the score model; returns nothing otherwise."""
    from dlsm.math.calibration import calibration_error
    from dlsm.math.losses import dlsm_loss

    test = ev.test_data() if ev.test_data is not None else None
    score_models = [m.score_model for m in ev.methods.values() if isinstance(m, ModelScores)]
    if test is None or not score_models or not ev.classifiers:
        return {}
    score_model = score_models[0]
    g = ev.generator(303)
    out: dict[str, float] = {}
    for sigma in sigmas:
        idx = torch.randint(0, len(test), (min(n_points, len(test)),), generator=g)
        x0, y = test.batch(idx)
        x0, y = x0.cpu(), y.cpu()
        z = torch.randn(x0.shape, generator=g)
        for name, clf in ev.classifiers.items():
            dev = next(clf.parameters()).device
            was_training = clf.training
            clf.eval()
            s = torch.full((x0.shape[0],), float(sigma), device=dev)
            per = dlsm_loss(clf, score_model, x0.to(dev), y.to(dev), s, z.to(dev), weight_power=0.0, reduce="sum")
            with torch.no_grad():
                logits = clf(x0.to(dev) + sigma * z.to(dev), s).cpu()
            clf.train(was_training)
            out[f"{name}/heldout/dlsm/s{sigma:g}"] = float(per.detach().double().mean())
            out[f"{name}/heldout/ce/s{sigma:g}"] = float(nn.functional.cross_entropy(logits, y))
            out[f"{name}/heldout/acc/s{sigma:g}"] = float((logits.argmax(1) == y).double().mean())
            out[f"{name}/heldout/ece/s{sigma:g}"] = calibration_error(logits, y)
    return out


@gin.configurable
def sample_metrics(
    ev: Evaluation, *, k: int = 5, n_projections: int = 256, reference_draws: int = 10
) -> dict[str, float]:
    """Precision, recall (k-NN) and sliced Wasserstein-1 of each method's class-c samples vs class-c data.

    With ``reference_draws > 0``, a row ``data`` scores that many exact samples of the sampler's target
    p_sigma_L(x|y) (class data drawn with replacement plus sigma_L-noise, as many points as the
    methods drew): the metrics' finite-sample floor. ``data/c{c}/sw1`` is the mean over draws and
    ``sw1_lo`` / ``sw1_hi`` the smallest and largest, the range a perfect sampler falls in.
    """
    out: dict[str, float] = {}
    for name, per_class in ev.samples.items():
        for c, samples in per_class.items():
            out.update(_sample_scores(ev, f"{name}/c{c}", ev.data.of_class(c), samples, k, n_projections))
    if reference_draws > 0 and ev.samples:
        first = next(iter(ev.samples.values()))
        n = next(iter(first.values())).shape[0]
        g, sigma_l = ev.generator(505), float(ev.schedule.sigmas[-1])
        for c in first:
            draws = [_sample_scores(ev, "", ev.data.of_class(c), _noisy_class_points(ev, c, sigma_l, n, g), k,
                                    n_projections) for _ in range(reference_draws)]
            for key in ("precision", "recall", "sw1"):
                vals = [d[f"/{key}"] for d in draws]
                out[f"data/c{c}/{key}"] = sum(vals) / len(vals)
            out[f"data/c{c}/sw1_lo"] = min(d["/sw1"] for d in draws)
            out[f"data/c{c}/sw1_hi"] = max(d["/sw1"] for d in draws)
    return out


def _sample_scores(ev: Evaluation, prefix: str, real: torch.Tensor, samples: torch.Tensor, k: int,
                   n_projections: int) -> dict[str, float]:
    if min(len(real), len(samples)) < k + 1:
        raise ConfigError(f"sample_metrics.k = {k} needs at least {k + 1} points per class, got {len(samples)} "
                          f"samples and {len(real)} data points; raise sample.n_per_class or lower k")
    real, samples = real.reshape(len(real), -1), samples.reshape(len(samples), -1)  # images: pixel vectors
    p, r = precision_recall(real, samples, k=k)
    sw = sliced_wasserstein(real, samples, n_projections=n_projections, generator=ev.generator(303))
    return {f"{prefix}/precision": p, f"{prefix}/recall": r, f"{prefix}/sw1": sw}
