"""Linear probe: the objective against a naive per-sample loop, the fit at its optimum, λ chosen on
held-out data, unseen classes counted as errors, and the probe metrics in evaluate_records."""

import math

import pytest
import torch

from lipkit.eval.linear_probe import fit_linear_probe, probe_loss


def _blobs(n_per_class: int, n_classes: int, dim: int, spread: float, seed: int, noise_seed: int = 0):
    """Gaussian blobs around class centres drawn from `seed`; `noise_seed` draws fresh samples."""
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(1000 + noise_seed)
    x = torch.cat(
        [centres[c] + spread * torch.randn(n_per_class, dim, generator=g) for c in range(n_classes)]
    )
    labels = [f"class-{c}" for c in range(n_classes) for _ in range(n_per_class)]
    return x, labels


def test_probe_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    x, y = torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)
    naive = 0.0
    for i in range(10):
        logits = [sum(w[c, d].item() * x[i, d].item() for d in range(6)) + b[c].item() for c in range(4)]
        naive -= logits[y[i]] - math.log(sum(math.exp(v) for v in logits))
    naive = naive / 10 + 0.01 * sum(v * v for v in w.flatten().tolist())
    assert probe_loss(w, b, x, y, 0.01).item() == pytest.approx(naive, rel=1e-6)


def test_fit_reaches_the_optimum_and_generalises():
    x, labels = _blobs(40, 5, 8, spread=0.8, seed=1)
    probe = fit_linear_probe(x, labels, lambdas=(1e-3,))
    # at the optimum of the (strictly convex) objective the gradient vanishes
    xs = ((x.double() - probe.mean) / probe.std).clone()
    y = torch.tensor([probe.classes.index(v) for v in labels])
    w, b = probe.weight.clone().requires_grad_(), probe.bias.clone().requires_grad_()
    probe_loss(w, b, xs, y, 1e-3).backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5
    test_x, test_labels = _blobs(20, 5, 8, spread=0.8, seed=1, noise_seed=1)  # same classes, new samples
    scores, idx, unseen = probe.classify(test_x, test_labels)
    assert unseen == 0 and (scores.argmax(1) == idx).double().mean() > 0.9


def test_lambda_is_chosen_on_held_out_data():
    """Few samples in many dimensions overfit: held-out accuracy prefers strong regularisation to none,
    and shuffled labels give held-out accuracy near chance."""
    x, labels = _blobs(12, 4, 64, spread=3.0, seed=2)
    probe = fit_linear_probe(x, labels, lambdas=(1e-8, 1e-1))
    assert probe.lam == 1e-1 and probe.val_top1 > 0.25
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3)).tolist()
    shuffled = fit_linear_probe(x, [labels[i] for i in perm], lambdas=(1e-8, 1e-1))
    assert shuffled.val_top1 < 0.6


def test_unseen_classes_count_as_errors():
    x, labels = _blobs(10, 3, 4, spread=0.1, seed=4)
    probe = fit_linear_probe(x, labels, lambdas=(1e-4,))
    scores, idx, unseen = probe.classify(x[:2], ["class-0", "never-seen"])
    assert unseen == 1 and scores.shape == (2, 4)
    assert scores[:, 3].isinf().all() and idx.tolist() == [0, 3]
    assert scores[1].argmax() != idx[1]
    from lipkit.eval.zeroshot import zeroshot_scores_metrics

    # top-5 over 4 columns includes the −inf one: it must still not count as a hit
    assert zeroshot_scores_metrics(scores[1:], idx[1:])["top5"] == 0.0
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_linear_probe(x[:3], ["a", "a", "a"])


def test_evaluate_records_reports_probe_metrics(table):
    from conftest import tiny_eval_setup
    from lipkit.config import EvalConfig
    from lipkit.data.table_batches import ImageStore
    from lipkit.eval.evaluate import embed_images, evaluate_records, fit_probes

    records, tok, model = tiny_eval_setup(table, n=24)
    cfg = EvalConfig(class_columns=["category", "no-such-column"], templates=["{}"])
    probes = fit_probes(model, records, cfg.class_columns, 16)
    assert set(probes) == {"category"}
    got = evaluate_records(model, tok, records, cfg, details=False, probes=probes)
    feats = embed_images(model, ImageStore(records, model.spec.image_size, cache=False), 16)
    scores, idx, _ = probes["category"].classify(feats, [r.meta["category"] for r in records])
    assert got["metrics"]["probe/category/top1"] == pytest.approx(
        (scores.argmax(1) == idx).double().mean().item()
    )
